"""Compile time and step time of a scanned vs an unrolled decoder stack (tiny Llama, CPU).

    python benchmarks/scan_vs_unrolled.py                       # depths 2 4 8 16
    python benchmarks/scan_vs_unrolled.py --depths 2 8 32 --repeats 20

For each depth, a random Llama (hidden 64, 4 query / 2 key-value heads, MLP 128, vocabulary 256)
is built unrolled and scanned (`scan_layers=True`), and a training-style step (loss and gradient
of next-token cross-entropy on a [8, 64] batch) is jitted. Reported: the time to trace and compile
that step, and the median time of one step after a warm-up call. Unrolled compile time grows with
depth (XLA sees every layer); scanned compile time stays flat (one layer body in a loop).
Prints a markdown table headed by the machine, the library versions and the date.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from pifi_jax.models.llama import LlamaConfig, LlamaForCausalLM  # noqa: E402
from pifi_jax.train.metrics import mean_next_token_loss  # noqa: E402

BATCH, LENGTH = 8, 64


def make_step(module):
    def loss(params, ids):
        logits = module.apply({"params": params}, ids)
        return mean_next_token_loss(logits, ids, jnp.ones_like(ids))

    return jax.jit(jax.value_and_grad(loss))


def measure(depth: int, scan: bool, repeats: int) -> tuple[float, float]:
    """(compile seconds, median step seconds) for one stack."""
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=depth,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=LENGTH,
    )
    module = LlamaForCausalLM(config, scan_layers=scan)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (BATCH, LENGTH)), jnp.int32)
    params = jax.jit(module.init)(jax.random.key(0), ids)["params"]
    step = make_step(module)
    start = time.perf_counter()
    compiled = step.lower(params, ids).compile()
    compile_s = time.perf_counter() - start
    timing = common.time_steps(
        lambda: compiled(params, ids), jax.block_until_ready, warmup=1, steps=repeats
    )
    return compile_s, timing.median_s


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    device = jax.devices()[0]
    for line in common.environment_lines(common.environment()):
        print(line)
    print(f"- device: {device.platform} ({device.device_kind})")
    print(f"- step: loss + gradient, batch [{BATCH}, {LENGTH}], median of {args.repeats}")
    print()
    header = ("layers", "compile unrolled (s)", "compile scanned (s)")
    header += ("step unrolled (ms)", "step scanned (ms)")
    print(common.markdown_table(header, [], "rrrrr"))
    measure(1, False, 1)  # JAX's one-time start-up costs, kept out of the first row
    for depth in args.depths:
        unrolled = measure(depth, False, args.repeats)
        scanned = measure(depth, True, args.repeats)
        print(
            f"| {depth} | {unrolled[0]:.2f} | {scanned[0]:.2f} "
            f"| {1e3 * unrolled[1]:.1f} | {1e3 * scanned[1]:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
