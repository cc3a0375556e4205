"""Train-step time of every PEFT method on the offline default, side by side in one run (CPU).

    python benchmarks/peft_steps.py                     # the six methods of docs/results.md
    python benchmarks/peft_steps.py --rounds 5 --length 32 --methods full,lora

Each method is set up exactly as `launch.train --config=configs/classify.py` sets it up
(`pifi_jax.train.setup_run`: MiniLM from the asset, the method's overrides, the trainer's
partition, optimizer and jitted, donated step), and trained on the same real Rotten Tomatoes
batches of one bucket length. After one compiling call each, the methods take turns, one step
at a time, for `--rounds` rounds, so a change in the machine's load reaches every method
alike. Reported: the median step time, its ratio to full fine-tuning, and steps/s. Prints a
markdown table headed by the machine, the library versions and the date.
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

# name -> config overrides (the rows of the PEFT table in docs/results.md).
METHODS = {
    "full": {"peft.method": "full", "optim.lr": 1e-4},
    "lora": {"peft.method": "lora", "peft.r": 8, "peft.lora_alpha": 16.0, "optim.lr": 1e-3},
    "ia3": {"peft.method": "ia3", "optim.lr": 5e-3},
    "adapter_houlsby": {"peft.method": "adapter_houlsby", "optim.lr": 1e-3},
    "bitfit": {"peft.method": "bitfit", "optim.lr": 1e-3},
    "prompt": {
        "peft.method": "prompt",
        "peft.prompt_tuning_init": "SAMPLE_VOCAB",
        "optim.lr": 1e-2,
    },
}


def method_config(name: str):
    """configs/classify.py with the method's overrides."""
    from configs import classify

    config = classify.get_config()
    for dotted, value in METHODS[name].items():
        section, key = dotted.split(".")
        config[section][key] = value
    return config


def same_length_batches(run, length: int, count: int) -> list[dict]:
    """The first `count` training batches of epoch 0 padded to `length` tokens."""
    out = []
    for batch in run.train_batches.batches(0):
        if batch["input_ids"].shape[1] == length:
            out.append(batch)
            if len(out) == count:
                return out
    raise SystemExit(f"peft_steps.py: fewer than {count} batches of length {length}")


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    parser.add_argument("--rounds", type=int, default=10, help="timed steps per method")
    parser.add_argument("--length", type=int, default=64, help="bucket length of the batches")
    args = parser.parse_args(argv)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(names) - set(METHODS))
    if unknown or not names:
        parser.error(f"--methods: unknown {unknown or 'none given'}; choose from {list(METHODS)}")

    import jax

    from pifi_jax.train.loop import setup_run

    def quiet(*_args, **_kw):
        pass

    runs, batches, rng = {}, None, jax.random.PRNGKey(0)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            print(f"[peft_steps] setting up {name}", file=sys.stderr, flush=True)
            runs[name] = setup_run(method_config(name), Path(tmp) / name, log=quiet)
            if batches is None:
                batches = same_length_batches(runs[name], args.length, args.rounds + 1)
        states = {name: run.state for name, run in runs.items()}
        compile_s = {}
        for name, run in runs.items():
            start = time.perf_counter()
            states[name], metrics = run.train_step(states[name], batches[0], rng)
            jax.block_until_ready(metrics)
            compile_s[name] = time.perf_counter() - start
        times = {name: [] for name in runs}
        for i in range(args.rounds):
            for name, run in runs.items():
                start = time.perf_counter()
                states[name], metrics = run.train_step(states[name], batches[1 + i], rng)
                jax.block_until_ready(metrics)
                times[name].append(time.perf_counter() - start)

    median = {name: statistics.median(t) for name, t in times.items()}
    reference = median.get("full")
    rows = []
    for name, run in runs.items():
        ratio = f"{median[name] / reference:.2f}" if reference else "-"
        rows.append(
            [
                name,
                f"{run.trainable_params:,}",
                f"{median[name] * 1e3:.0f}",
                f"{1 / median[name]:.2f}",
                ratio,
                f"{compile_s[name]:.1f}",
            ]
        )
    env = common.environment()
    lines = [
        f"### PEFT train-step times, MiniLM on Rotten Tomatoes, batch 32 x {args.length} (CPU)",
        "",
        *common.environment_lines(env),
        f"- median of {args.rounds} steps per method, the methods taking turns step by step",
        "",
        common.markdown_table(
            [
                "method",
                "trainable params",
                "step ms",
                "steps/s",
                "step time / full FT",
                "first call s (compile)",
            ],
            rows,
            "lrrrrr",
        ),
    ]
    report = "\n".join(lines)
    print(report)
    return report


if __name__ == "__main__":
    main()
