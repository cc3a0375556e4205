"""Train-step speed on the CPU: pifi_jax vs transformers + PEFT, eager and torch.compile (issue 16).

    python benchmarks/cpu_speed.py                          # every row, 10 rounds
    python benchmarks/cpu_speed.py --models=minilm --methods=full,lora --lengths=64 --rounds=5
    python benchmarks/cpu_speed.py --jax-variants=default,xnnpack   # XLA CPU options side by side
    python benchmarks/cpu_speed.py --smoke                  # tiny shapes: a harness check

Rows: an encoder (MiniLM-L6-H384 at the offline asset's shape, and a bert-base-shaped one) x a
method (full fine-tuning; LoRA r8 on query, value; IA3 on key, value, output.dense; PiFi: the
encoder plus SmolLM2-135M's last decoder layer, frozen, on the [CLS] token) x a batch (32 x 64 and
32 x 128 tokens), float32, AdamW with clipping: the shapes and the step of `benchmarks/suite.py`
(its `prepare_jax_step` and `torch_reference.prepare_step`, randomly initialised; speed does not
depend on the weights' values).

Everything of one row runs in this process, interleaved: after one untimed call each (the
compilation), every framework takes one step in turn for `--rounds` rounds, so a change in the
machine's load reaches them alike. The table gives the median step, tokens/s, and pifi_jax's
tokens/s over the best PyTorch variant's (target >= 1.2x, issue 16). PyTorch keeps its default
threads; its OpenMP workers are told not to spin while idle (`OMP_WAIT_POLICY=PASSIVE`, set
before torch is imported), since spinning workers would starve XLA's threads between turns.

`--jax-variants` compiles pifi_jax's step once per named set of XLA CPU compiler options
(`JAX_VARIANTS`) and times each as its own framework line: what the library's CPU defaults are
chosen from. Results are printed and, with `--out`, appended to a markdown file
(docs/benchmarks.md) headed by the machine, versions and date.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import common  # noqa: E402

TARGET = 1.2  # pifi_jax tokens/s over the best PyTorch variant's, on every CPU row
MODELS = ("minilm", "bert-base")
METHODS = ("full", "lora", "ia3", "pifi")
TORCH_VARIANTS = ("eager", "compile")
# name -> XLA compiler options of pifi_jax's step (jax.jit(...).lower(...).compile(options)).
JAX_VARIANTS = {
    "default": {},
    "xnnpack": {"xla_cpu_use_xnnpack": True},
    "onednn": {"xla_cpu_use_onednn": True},
    "fast_math": {"xla_cpu_enable_fast_math": True},
    # JAX's own CPU lowering of the random bits (a rolled loop; pifi_jax.layers.cpu_rng)
    "rolled_threefry": {},
}
LORA = {"method": "lora", "r": 8, "lora_alpha": 16, "target_modules": ("query", "value")}
IA3 = {
    "method": "ia3",
    "target_modules": ("key", "value", "output.dense"),
    "feedforward_modules": ("output.dense",),
}


def encoder_shape(name: str, smoke: bool) -> dict:
    """The Hugging Face config dict of an encoder row (MiniLM: the asset's own config.json)."""
    if smoke:
        return dict(common.BERT_SMOKE)
    if name == "bert-base":
        return dict(common.BERT_BASE)
    from pifi_jax import assets
    from pifi_jax.hub.files import read_config

    config = read_config(assets.locate("minilm"))
    keep = (*common.BERT_BASE, "layer_norm_eps", "hidden_act")
    return {k: config[k] for k in keep if k in config}


def decoder_shape(smoke: bool) -> dict:
    """SmolLM2-135M's config (the PiFi default LLM, from the offline GGUF's metadata)."""
    if smoke:
        return dict(common.LLAMA_SMOKE)
    from pifi_jax.hub.pretrained import open_checkpoint

    _, config = open_checkpoint("asset:smollm2")
    return dict(config)


def cases(models, methods, lengths, batch: int, smoke: bool) -> list[common.Case]:
    llm = decoder_shape(smoke) if "pifi" in methods else None
    out = []
    for model in models:
        encoder = encoder_shape(model, smoke)
        for length in lengths:
            for method in methods:
                peft = {"lora": LORA, "ia3": IA3}.get(method)
                decoder = llm if method == "pifi" else None
                out.append(common.Case(0, method, batch, length, encoder, decoder, peft))
    return out


def jax_line(case: common.Case, options: dict, fast_compile: bool, rolled: bool = False):
    """(step, sync, info): pifi_jax's donated train step of the case, compiled with `options`
    (rolled: with JAX's own rolled lowering of the random bits)."""
    import contextlib

    import jax

    from benchmarks import suite
    from pifi_jax.layers import cpu_rng

    jitted, state, batch, rng, info = suite.prepare_jax_step(
        case, dtype="float32", total_steps=10_000, fast_compile=fast_compile
    )
    start = time.perf_counter()
    with cpu_rng.rolled() if rolled else contextlib.nullcontext():
        lowered = jitted.lower(state, batch, rng)
    compiled = lowered.compile({**(suite._fast_options(fast_compile) or {}), **options})
    analysis = compiled.memory_analysis()
    step_bytes = analysis.argument_size_in_bytes + analysis.temp_size_in_bytes
    info = {**info, "compile_s": time.perf_counter() - start, "step_bytes": step_bytes}
    holder = {"state": state}
    del state

    def step():
        holder["state"], metrics = compiled(holder["state"], batch, rng)
        return metrics["loss"]

    return step, jax.block_until_ready, info


def torch_line(case: common.Case, variant: str):
    import torch

    from benchmarks import torch_reference

    return torch_reference.prepare_step(case, variant, dtype="float32", device=torch.device("cpu"))


def measure_row(case, lines: dict, rounds: int) -> dict:
    """{line: {"first_s", "times", "loss"}}: one untimed call each (first_s: with pifi_jax's
    compilation), then `rounds` interleaved."""
    out = {}
    for name, (step, sync, info) in lines.items():
        start = time.perf_counter()
        sync(step())
        first = time.perf_counter() - start + info.get("compile_s", 0.0)
        out[name] = {"first_s": first, "times": []}
    for _ in range(rounds):
        for name, (step, sync, _) in lines.items():
            start = time.perf_counter()
            loss = step()
            sync(loss)
            out[name]["times"].append(time.perf_counter() - start)
            out[name]["loss"] = float(loss.detach() if hasattr(loss, "detach") else loss)
    return out


def row_table(case: common.Case, result: dict) -> list[list[str]]:
    medians = {name: statistics.median(r["times"]) for name, r in result.items()}
    torch_best = min((m for n, m in medians.items() if n.startswith("torch")), default=None)
    rows = []
    for name, median in medians.items():
        ratio = met = ""
        if not name.startswith("torch") and torch_best is not None:
            ratio = f"{torch_best / median:.2f}x"
            met = "yes" if torch_best / median >= TARGET else "no"
        rows.append(
            [
                f"{case.method} {case.batch}x{case.length}",
                name,
                f"{median * 1e3:.0f}",
                f"{case.tokens / median:,.0f}",
                f"{result[name]['first_s']:.1f}",
                ratio,
                met,
            ]
        )
    return rows


HEADER = [
    "case",
    "framework",
    "median step ms",
    "tokens/s",
    "first call s",
    "pifi_jax / best torch",
    f">= {TARGET}x",
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--lengths", default="64,128")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--torch-variants", default=",".join(TORCH_VARIANTS))
    parser.add_argument("--jax-variants", default="default")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (a harness check)")
    parser.add_argument("--out", default=None, help="markdown file the section is appended to")
    args = parser.parse_args(argv)

    def names(text, known, flag):
        got = [t.strip() for t in text.split(",") if t.strip()]
        bad = sorted(set(got) - set(known))
        if bad or not got:
            parser.error(f"--{flag}: unknown {bad or 'none given'}; choose from {list(known)}")
        return got

    args.models = names(args.models, MODELS, "models")
    args.methods = names(args.methods, METHODS, "methods")
    args.torch_variants = names(args.torch_variants, TORCH_VARIANTS, "torch-variants")
    args.jax_variants = names(args.jax_variants, JAX_VARIANTS, "jax-variants")
    try:
        args.lengths = [int(t) for t in args.lengths.split(",") if t.strip()]
    except ValueError:
        parser.error(f"--lengths takes comma-separated integers, got {args.lengths!r}")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    return args


def main(argv=None) -> str:
    args = parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported
    lengths = [16] if args.smoke else args.lengths
    batch = 2 if args.smoke else args.batch
    table = []
    models = args.models[:1] if args.smoke else args.models  # one tiny shape stands for all
    for case in cases(models, args.methods, lengths, batch, args.smoke):
        print(f"[cpu_speed] {case.encoder['hidden_size']}-wide {case.label}", file=sys.stderr)
        lines = {}
        for variant in args.jax_variants:
            name = "pifi_jax" if variant == "default" else f"pifi_jax {variant}"
            rolled = variant == "rolled_threefry"
            lines[name] = jax_line(case, JAX_VARIANTS[variant], args.smoke, rolled)
        for variant in args.torch_variants:
            lines[f"torch {variant}"] = torch_line(case, variant)
        result = measure_row(case, lines, args.rounds)
        width = f"{case.encoder['num_hidden_layers']}x{case.encoder['hidden_size']}"
        for row in row_table(case, result):
            table.append([width, *row])
    env = common.environment()
    title = "CPU train steps, pifi_jax vs PyTorch" + (" (smoke: a harness check)" * args.smoke)
    lines = [
        f"### {title}",
        "",
        *common.environment_lines(env),
        f"- `python benchmarks/cpu_speed.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- float32, AdamW + clipping; median of {args.rounds} interleaved steps after one untimed "
        "call each (first call: with the compilation, pifi_jax's and torch.compile's)",
        "",
        common.markdown_table(["encoder", *HEADER], table, "lllrrrrl"),
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        common.publish(report, args.out)
    return report


if __name__ == "__main__":
    main()
