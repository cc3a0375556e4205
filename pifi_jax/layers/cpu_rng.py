"""Dropout's random bits on the CPU: JAX's Threefry-2x32 lowered as straight-line code.

Every random draw of a training step (dropout's masks above all) is JAX's Threefry-2x32 hash of a
counter. On the CPU, JAX lowers the hash's five double-rounds as a rolled loop (an XLA `while`
of 5 iterations), which keeps compilation short but cannot fuse: each iteration reads and writes
two uint32 arrays of the mask's full size, and the mask's comparison and select wait for the
loop. On MiniLM's train step (batch 32 x 64) that loop was 11% of the step (284 of 2,487 ms,
profiled with XLA's per-thunk trace; benchmarks/cpu_speed.py). Unrolled, the 20 rounds and the
consumer fuse into one pass over the mask.

`install()` (run when pifi_jax.layers is imported) registers, for the CPU platform only, a
lowering of `threefry2x32_p` that emits the rounds unrolled for draws of at least
`UNROLL_MIN_SIZE` values, and the rolled loop below it (tiny draws: compile time matters more than
the pass). The hash is the same function either way, so every random value, and every training
run, is bitwise what it was (tested against JAX's own lowering and a NumPy transcription of the
hash). `PIFI_JAX_ROLLED_THREEFRY=1` in the environment leaves JAX's lowering alone.

The hash (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011): key (k0, k1),
k2 = k0 ^ k1 ^ 0x1BD11BDA; x0 += k0, x1 += k1; then five times four rounds
(x0 += x1; x1 = rotl(x1, r) ^ x0) with rotations (13, 15, 26, 6) and (17, 29, 16, 24) in turn,
each group followed by a key injection x0 += k[(i+1) % 3], x1 += k[(i+2) % 3] + i + 1.
"""

from __future__ import annotations

import contextlib
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
PARITY = 0x1BD11BDA
UNROLL_MIN_SIZE = 1 << 14  # values per draw from which the rounds are unrolled
ENV_OPT_OUT = "PIFI_JAX_ROLLED_THREEFRY"
_installed = False
_force_rolled = False  # `rolled()`: lower every draw as the loop (a before/after measurement)


def _rotl(v, r: int):
    return (v << np.uint32(r)) | (v >> np.uint32(32 - r))


def _inject(x0, x1, ks, i):
    """The key injection after group i of four rounds."""
    return x0 + ks[(i + 1) % 3], x1 + ks[(i + 2) % 3] + np.uint32(i + 1)


def _group(x0, x1, i):
    for r in ROTATIONS[i % 2]:
        x0 = x0 + x1
        x1 = _rotl(x1, r) ^ x0
    return x0, x1


def threefry2x32_unrolled(k0, k1, x0, x1):
    """Threefry-2x32 (20 rounds) of the uint32 counters (x0, x1) under key (k0, k1), as
    straight-line jnp code (broadcasting as jnp does)."""
    ks = (k0, k1, k0 ^ k1 ^ np.uint32(PARITY))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for i in range(5):
        x0, x1 = _inject(*_group(x0, x1, i), ks, i)
    return x0, x1


def threefry2x32_rolled(k0, k1, x0, x1):
    """The same hash as a loop of five groups (two groups a pass, the key schedule rotating):
    small programs, for small draws."""
    shape = jnp.broadcast_shapes(*(jnp.shape(a) for a in (k0, k1, x0, x1)))
    ks = (k0, k1, k0 ^ k1 ^ np.uint32(PARITY))
    x0 = jnp.broadcast_to(x0 + ks[0], shape)
    x1 = jnp.broadcast_to(x1 + ks[1], shape)
    keys = jnp.stack(jnp.broadcast_arrays(*ks))  # [3, *key shape]

    def two_groups(j, carry):  # groups 2j (rotations 0) and 2j + 1 (rotations 1)
        x0, x1 = carry
        for g in range(2):
            i = 2 * j + g
            x0, x1 = _group(x0, x1, g)
            x0 = x0 + keys[(i + 1) % 3]
            x1 = x1 + keys[(i + 2) % 3] + (i + 1).astype(jnp.uint32)
        return x0, x1

    x0, x1 = jax.lax.fori_loop(0, 2, two_groups, (x0, x1))
    return _inject(*_group(x0, x1, 4), ks, 4)  # the fifth group


def _lowering(ctx, k0, k1, x0, x1):
    size = math.prod(ctx.avals_out[0].shape)
    unroll = size >= UNROLL_MIN_SIZE and not _force_rolled
    fn = threefry2x32_unrolled if unroll else threefry2x32_rolled
    return jax.interpreters.mlir.lower_fun(fn, multiple_results=True)(ctx, k0, k1, x0, x1)


@contextlib.contextmanager
def rolled():
    """Programs lowered inside draw with the rolled loop at every size (what JAX's own CPU
    lowering emits): benchmarks/cpu_speed.py's before/after line."""
    global _force_rolled
    previous, _force_rolled = _force_rolled, True
    try:
        yield
    finally:
        _force_rolled = previous


def install() -> bool:
    """Registers the CPU lowering (once); False when the environment opts out."""
    global _installed
    if os.environ.get(ENV_OPT_OUT, "") not in ("", "0"):
        return False
    if not _installed:
        from jax.extend.random import threefry2x32_p
        from jax.interpreters import mlir

        mlir.register_lowering(threefry2x32_p, _lowering, platform="cpu")
        _installed = True
    return True
