"""What the plugged layer costs: train-step time and compiled memory, PiFi vs base (CPU).

    python benchmarks/pifi_cost.py                           # both parts, 5 timed rounds
    python benchmarks/pifi_cost.py --part classification --rounds 9

Part "classification": MiniLM on real Rotten Tomatoes batches (`configs/pifi.py`, batch 32,
one bucket length), the base model against MiniLM with the last layer of SmolLM2-135M,
Qwen2.5-Coder-0.5B and Qwen2.5-Coder-1.5B (the layer on the [CLS] token, bf16, frozen).
Part "generation": SmolLM2-135M with LoRA on real sciq_question batches
(`configs/pifi.py:task=sciq_question`, batch 8), alone against SmolLM2 with Qwen2.5-Coder-1.5B's
last layer before its LM head (over every token, causal).

Every arm is set up as the trainer sets it up (`setup_run`: the config's optimiser, clipping,
partition and jit). The arms of a part take turns step by step on the same batches for
`--rounds` rounds; reported are the median step times, their ratio to the base arm, the compiled
step's memory (`memory_analysis()`: arguments + temporaries, a stable measure on the CPU) and its
ratio, and the parameter counts. The Qwen assets come from requirements-assets-qwen.txt; an arm
whose asset is missing is left out with a note. Prints markdown headed by the machine, versions
and date.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import common  # noqa: E402

# part -> (configs/pifi.py argument of every arm, default bucket length, arms: name -> the
# config argument's extra items, with method=base for the baseline).
PARTS = {
    "classification": (
        "task=rt",
        64,
        {
            "base": "method=base",
            "+ SmolLM2-135M layer": "llm=smollm2",
            "+ Qwen2.5-Coder-0.5B layer": "llm=qwen2.5-coder-0.5b",
            "+ Qwen2.5-Coder-1.5B layer": "llm=qwen2.5-coder-1.5b",
        },
    ),
    "generation": (
        "task=sciq_question",
        128,
        {
            "base": "method=base",
            "+ Qwen2.5-Coder-1.5B layer": "llm=qwen2.5-coder-1.5b",
        },
    ),
}
_ASSET_OF = {
    "llm=smollm2": "smollm2",
    "llm=qwen2.5-coder-0.5b": "qwen2.5-coder-0.5b",
    "llm=qwen2.5-coder-1.5b": "qwen2.5-coder-1.5b",
}


def arm_config(part: str, arm: str, extra=()):
    """configs/pifi.py for one arm, then `extra` overrides ("a.b=value")."""
    from configs import pifi as pifi_config

    base_arg, _, arms = PARTS[part]
    config = pifi_config.get_config(f"{base_arg},{arms[arm]}")
    common.apply_overrides(config, list(extra))
    return config


def _available(item: str) -> bool:
    from pifi_jax import assets

    name = _ASSET_OF.get(item)
    return name is None or assets.is_available(name)


def measure(part: str, rounds: int, length: int, extra=()) -> str:
    import jax

    from pifi_jax.train.loop import setup_run
    from pifi_jax.train.partition import flatten

    def quiet(*_a, **_k):
        pass

    _, _, arms = PARTS[part]
    llm_given = any(item.startswith("pifi.llm=") for item in extra)
    missing = [arm for arm, item in arms.items() if not (llm_given or _available(item))]
    runs, batches = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        for index, arm in enumerate(a for a in arms if a not in missing):
            print(f"[pifi_cost] {part}: setting up {arm}", file=sys.stderr, flush=True)
            runs[arm] = setup_run(arm_config(part, arm, extra), Path(tmp) / str(index), log=quiet)
            if batches is None:
                batches = [
                    b
                    for b in runs[arm].train_batches.batches(0)
                    if b["input_ids"].shape[1] == length
                ][: rounds + 1]
                if len(batches) < rounds + 1:
                    raise SystemExit(f"fewer than {rounds + 1} training batches of length {length}")
        rng = jax.random.PRNGKey(0)
        states = {arm: run.state for arm, run in runs.items()}
        memory, compile_s = {}, {}
        for arm, run in runs.items():
            start = time.perf_counter()
            compiled = run.train_step.lower(states[arm], batches[0], rng).compile()
            compile_s[arm] = time.perf_counter() - start
            analysis = compiled.memory_analysis()
            memory[arm] = analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
            states[arm], metrics = run.train_step(states[arm], batches[0], rng)  # untimed
            jax.block_until_ready(metrics)
        times = {arm: [] for arm in runs}
        for i in range(rounds):
            for arm, run in runs.items():
                start = time.perf_counter()
                states[arm], metrics = run.train_step(states[arm], batches[1 + i], rng)
                jax.block_until_ready(metrics)
                times[arm].append(time.perf_counter() - start)
        frozen = {
            arm: sum(int(v.size) for p, v in flatten(run.state.frozen).items() if "llm_layer" in p)
            for arm, run in runs.items()
        }

    median = {arm: statistics.median(t) for arm, t in times.items()}
    base = "base" if "base" in runs else next(iter(runs))
    rows = [
        [
            arm,
            f"{runs[arm].trainable_params:,}",
            f"{frozen[arm]:,}",
            f"{median[arm]:.3f}",
            f"{median[arm] / median[base]:.2f}",
            common.fmt_bytes(memory[arm]),
            f"{memory[arm] / memory[base]:.2f}",
            f"{compile_s[arm]:.0f}",
        ]
        for arm in runs
    ]
    batch = batches[0]["input_ids"].shape
    what = {
        "classification": "MiniLM on real Rotten Tomatoes",
        "generation": "SmolLM2-135M + LoRA on real sciq_question",
    }[part]
    lines = [
        f"### PiFi's cost: {what}, batch {batch[0]} x {batch[1]} tokens (CPU)",
        "",
        *common.environment_lines(common.environment()),
        f"- median of {rounds} steps per arm, the arms taking turns step by step on the same "
        "batches; the trainer's step (`setup_run`); the frozen layer stored in bf16",
        "- memory: the compiled step's `memory_analysis()`, arguments + temporaries",
        *[f"- left out (asset not installed): {arm}" for arm in missing],
        *([f"- overrides of every arm: {', '.join(extra)}"] if extra else []),
        "",
        common.markdown_table(
            [
                "arm",
                "trainable params",
                "frozen layer params",
                "step s",
                "step / base",
                "step memory",
                "memory / base",
                "compile s",
            ],
            rows,
            "lrrrrrrr",
        ),
    ]
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=(*PARTS, "both"), default="both")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per arm")
    parser.add_argument("--length", type=int, default=0, help="bucket length (0: the part's)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every arm, e.g. pifi.llm=/path (repeatable)",
    )
    args = parser.parse_args(argv)
    parts = PARTS if args.part == "both" else [args.part]
    report = "\n\n".join(
        measure(p, args.rounds, args.length or PARTS[p][1], args.set) for p in parts
    )
    print(report)
    return report


if __name__ == "__main__":
    main()
