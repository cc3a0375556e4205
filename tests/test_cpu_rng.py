"""pifi_jax.layers.cpu_rng: the CPU lowering of Threefry-2x32 gives JAX's random values bitwise.

References: a NumPy transcription of the hash (Salmon et al. 2011; the known-answer vectors of
the Random123 distribution), and JAX's own lowering in a fresh process that opts out.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pifi_jax.layers import cpu_rng

M = 0xFFFFFFFF


def numpy_threefry(key, x):
    """Threefry-2x32, 20 rounds, in Python integers."""

    def rotl(v, r):
        return ((v << r) | (v >> (32 - r))) & M

    ks = [key[0], key[1], key[0] ^ key[1] ^ 0x1BD11BDA]
    x0, x1 = (x[0] + ks[0]) & M, (x[1] + ks[1]) & M
    for i in range(5):
        for r in ((13, 15, 26, 6), (17, 29, 16, 24))[i % 2]:
            x0 = (x0 + x1) & M
            x1 = rotl(x1, r) ^ x0
        x0 = (x0 + ks[(i + 1) % 3]) & M
        x1 = (x1 + ks[(i + 2) % 3] + i + 1) & M
    return x0, x1


# Random123's known-answer test vectors for threefry2x32_20 (kat_vectors).
KAT = [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
]


@pytest.mark.parametrize("fn", [cpu_rng.threefry2x32_unrolled, cpu_rng.threefry2x32_rolled])
def test_both_forms_are_threefry_2x32(fn):
    for key, x, want in KAT:
        assert numpy_threefry(key, x) == want
        got = jax.jit(fn)(*(jnp.uint32(v) for v in (*key, *x)))
        assert tuple(int(v) for v in got) == want
    rng = np.random.default_rng(0)
    k = rng.integers(0, 2**32, 2, dtype=np.uint64).astype(np.uint32)
    x = rng.integers(0, 2**32, (2, 300), dtype=np.uint64).astype(np.uint32)
    got = np.stack(jax.jit(fn)(jnp.uint32(k[0]), jnp.uint32(k[1]), x[0], x[1]))
    want = np.array([numpy_threefry(tuple(map(int, k)), (int(a), int(b))) for a, b in x.T]).T
    np.testing.assert_array_equal(got, want)


DRAWS = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
import pifi_jax  # installs the lowering unless the environment opts out
key = jax.random.PRNGKey(3)
out = {}
for shape in [(7,), (300, 129)]:  # below and above UNROLL_MIN_SIZE
    bits = jax.jit(lambda k: jax.random.bits(k, shape))(key)
    keep = jax.jit(lambda k: jax.random.bernoulli(k, 0.9, shape))(key)
    split = jax.jit(lambda k: jax.random.split(k, 5))(key)
    out[str(shape)] = [np.asarray(bits).tolist(), np.asarray(keep).tolist(),
                       np.asarray(jax.random.key_data(split)).tolist()]
print(json.dumps(out))
"""


def _draws(opt_out: bool) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop(cpu_rng.ENV_OPT_OUT, None)
    if opt_out:
        env[cpu_rng.ENV_OPT_OUT] = "1"
    out = subprocess.run(
        [sys.executable, "-c", DRAWS], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_random_values_are_jaxs_own_bitwise():
    assert cpu_rng.UNROLL_MIN_SIZE > 7 and 300 * 129 >= cpu_rng.UNROLL_MIN_SIZE
    assert _draws(opt_out=False) == _draws(opt_out=True)


def test_the_lowering_is_installed_and_unrolls_large_draws():
    assert cpu_rng._installed
    key = jax.random.PRNGKey(0)
    big = jax.jit(lambda k: jax.random.bits(k, (256, 256))).lower(key).as_text()
    small = jax.jit(lambda k: jax.random.bits(k, (8,))).lower(key).as_text()
    assert "while" not in big and "while" in small


def test_rolled_lowers_every_draw_as_the_loop():
    fn = jax.jit(lambda k: jax.random.bits(k, (256, 256)))
    key = jax.random.PRNGKey(0)
    with cpu_rng.rolled():
        text = jax.jit(lambda k: jax.random.bits(k, (256, 255))).lower(key).as_text()
    assert "while" in text and "while" not in fn.lower(key).as_text()
