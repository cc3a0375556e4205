"""Causal-LM packing on a real decoder and real text pairs: padding, steps and epoch time (CPU).

    python benchmarks/packing.py                      # quality, then the epoch timing
    python benchmarks/packing.py --part epoch --set data.buckets="(64,128,256,512)"

The model is the real SmolLM2-135M-Instruct (its GGUF asset) with LoRA r 8 / alpha 16, the task
the offline `sciq_question` pairs (benchmarks/generation_study.py describes both), everything
through `configs/causal_lm.py`; packed runs add `--config.data.pack=True`.

Part "epoch": one training epoch (batch 8, seed 0) unpacked and packed, set up as the trainer does
(`setup_run`). Reported: batches per epoch, token slots computed and the share of them holding
real tokens, and the wall time of the whole epoch for each, the two runs taking turns batch by
batch (so both see the same machine), every batch shape compiled beforehand (the compile time is
reported apart).
Part "quality": a packed LoRA epoch scored as generation_study.py's rows are (greedy, ROUGE/BLEU on
the whole validation and test splits), next to the same run unpacked.
Prints markdown headed by the machine, the versions and the date.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import common  # noqa: E402
from benchmarks.generation_study import SCORES, method_config  # noqa: E402

ARMS = {"unpacked": ["data.pack=False"], "packed": ["data.pack=True"]}


def _config(arm: str, args):
    return method_config("lora", args.train_examples, 1, args.model, [*args.set, *ARMS[arm]])


def epoch(args) -> str:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pifi_jax.train.loop import setup_run

    def quiet(*_a, **_k):
        pass

    rng = jax.random.PRNGKey(0)
    rows, timed = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        runs, batches, states, compile_s = {}, {}, {}, {}
        for arm in ARMS:
            print(f"[packing] setting up {arm}", file=sys.stderr, flush=True)
            run = runs[arm] = setup_run(_config(arm, args), Path(tmp) / arm, log=quiet)
            batches[arm] = list(run.train_batches.batches(0))
            states[arm] = run.state
            start = time.perf_counter()
            for length in sorted({b["input_ids"].shape[1] for b in batches[arm]}):
                first = next(b for b in batches[arm] if b["input_ids"].shape[1] == length)
                copy = jax.tree.map(jnp.copy, run.state)  # the step may donate its state
                jax.block_until_ready(run.train_step(copy, first, rng))
            compile_s[arm] = time.perf_counter() - start
        timed = dict.fromkeys(ARMS, 0.0)
        losses = {arm: [] for arm in ARMS}
        longest = max(len(b) for b in batches.values())
        for i in range(longest):
            for arm, run in runs.items():
                if i >= len(batches[arm]):
                    continue
                start = time.perf_counter()
                states[arm], metrics = run.train_step(states[arm], batches[arm][i], rng)
                jax.block_until_ready(metrics)
                timed[arm] += time.perf_counter() - start
                losses[arm].append(float(metrics["loss"]))
        for arm in ARMS:
            slots = sum(b["input_ids"].size for b in batches[arm])
            real = sum(int((b["attention_mask"] != 0).sum()) for b in batches[arm])
            targets = sum(int(b["loss_mask"][:, 1:].sum()) for b in batches[arm])
            rows.append(
                [
                    arm,
                    str(len(batches[arm])),
                    f"{slots:,}",
                    f"{real / slots:.1%}",
                    f"{targets:,}",
                    f"{timed[arm]:.0f}",
                    f"{timed[arm] / timed['unpacked']:.2f}",
                    f"{targets / timed[arm]:.0f}",
                    f"{np.mean(losses[arm][-5:]):.3f}",
                    f"{compile_s[arm]:.0f}",
                ]
            )
    buckets = tuple(runs["packed"].train_batches.buckets.tolist())
    lines = [
        f"### One LoRA epoch, SmolLM2-135M on sciq_question, packed vs unpacked (CPU, buckets {buckets})",
        "",
        *common.environment_lines(common.environment()),
        f"- {args.train_examples or 'all 709'} training pairs, batch 8 (rows), seed 0; packed rows "
        f"hold up to {buckets[-1]} tokens; the two epochs take turns batch by batch; every "
        "batch shape compiled before the timing",
        "",
        common.markdown_table(
            [
                "batches",
                "steps / epoch",
                "token slots",
                "real tokens",
                "target tokens",
                "epoch s",
                "epoch / unpacked",
                "target tokens / s",
                "mean loss, last 5 steps",
                "compile s",
            ],
            rows,
            "lrrrrrrrrr",
        ),
    ]
    return "\n".join(lines)


def quality(args) -> str:
    from pifi_jax.train import train_and_evaluate

    rows = []
    for arm in ARMS:
        workdir = Path(args.workdir) / arm
        done = workdir / "results.json"
        if done.exists():
            results = json.loads(done.read_text())
        else:
            print(f"[packing] training {arm}", file=sys.stderr, flush=True)
            results = train_and_evaluate(_config(arm, args), workdir)
        rows.append(
            [
                arm,
                *(f"{results[f'test/{s}']:.2f}" for s in SCORES),
                f"{results['validation/rougeL']:.2f}",
                f"{results['train_seconds']:.0f}",
            ]
        )
    lines = [
        "### LoRA on sciq_question, packed vs unpacked: scores after one epoch (CPU)",
        "",
        *common.environment_lines(common.environment()),
        f"- {args.train_examples or 'all 709'} training pairs, 1 epoch, batch 8 rows, LoRA r 8 "
        "/ alpha 16, lr 1e-3; greedy generation, at most 64 new tokens; the whole validation and "
        "test splits",
        "- command: `python -m launch.train --config=configs/causal_lm.py --workdir=... "
        "--config.data.pack=True` (packed) or without the flag (unpacked)",
        "",
        common.markdown_table(
            ["batches", *(f"test {s}" for s in SCORES), "val rougeL", "train s"],
            rows,
            "lrrrrrr",
        ),
    ]
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("quality", "epoch", "both"), default="both")
    parser.add_argument("--model", default="asset:smollm2")
    parser.add_argument(
        "--train-examples", type=int, default=0, help="cap of every split (0 = all)"
    )
    parser.add_argument("--workdir", default="runs/packing")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every run, e.g. data.buckets=(64,128,256,512) (repeatable)",
    )
    args = parser.parse_args(argv)
    parts = []
    if args.part in ("quality", "both"):
        parts.append(quality(args))
    if args.part in ("epoch", "both"):
        parts.append(epoch(args))
    report = "\n\n".join(parts)
    print(report)
    return report


if __name__ == "__main__":
    main()
