"""Decoders sharded over 8 fake CPU devices give the single-device logits and gradients.

XLA reads `--xla_force_host_platform_device_count` once, when the backend starts, so the sharded
runs happen in one child python (`conftest.subprocess_env(8)`). The child loads a tiny checkpoint
with `from_pretrained(..., mesh=mesh)` (each tensor placed straight into its sharding as it is
read; a scanned stack is stacked on device, in its sharding), and compares, for each mesh, the
logits and the gradient of a next-token loss with those of the same checkpoint on one device.

Meshes: fsdp=8 (every "embed" dimension, 32 wide, cut 8 ways) and data=2 x tensor=4 (query heads,
MLP and vocabulary cut 4 ways). The checkpoints are sized so those divide: hidden 32, 4 query heads
and 2 key/value heads of width 8 ("kv" stays replicated), intermediate 64, vocabulary 128.

Tolerance: sharding changes only the order of float32 reductions (a sum split over devices is
added up differently), so logits agree to LOGITS_ATOL and gradients to GRAD_ATOL (measured:
about 1e-6 and 1e-8; logits are ~1 and gradients ~1e-2, so a wrong or missing shard shows up
orders of magnitude above either).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, subprocess_env
from tests.test_models_decoders import tiny_decoder

torch = pytest.importorskip("torch")

LOGITS_ATOL = 1e-5
GRAD_ATOL = 1e-6
TIMEOUT_S = 300
SIZES = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
)
# name -> (tiny_decoder case, overrides, scan_layers)
MODELS = {
    "llama": ("llama", SIZES, False),
    "llama_scanned": ("llama", SIZES, True),
    "gpt2_scanned": ("gpt2", dict(vocab_size=128), True),
}
MESHES = {"fsdp8": {"fsdp": 8}, "data2_tensor4": {"data": 2, "tensor": 4}}
# Each sharded run compiles a forward and backward pass for 8 devices (seconds each on a busy
# CPU): the default run covers both meshes and both stack layouts in two runs, the rest is slow.
FAST = [("llama", "fsdp8"), ("llama_scanned", "data2_tensor4")]
SLOW = [(m, mesh) for m in MODELS for mesh in MESHES if (m, mesh) not in FAST]

_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from pifi_jax import parallel
from pifi_jax.hub import from_pretrained
from pifi_jax.hub.pretrained import _flatten
from pifi_jax.train.metrics import mean_next_token_loss

jobs, meshes = json.loads(sys.argv[1]), json.loads(sys.argv[2])
rng = np.random.default_rng(0)
ids = rng.integers(0, 128, size=(8, 12)).astype(np.int32)
mask = np.ones_like(ids)
for row in range(8):
    mask[row, : row % 4] = 0  # left padding of 0..3 tokens


def run(module, params, ids, mask):
    def loss(params):
        logits = module.apply({"params": params}, ids, mask)
        return mean_next_token_loss(logits, ids, mask), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return np.asarray(logits), {p: np.asarray(g) for p, g in _flatten(grads).items()}


out = {}
for name, path, scan, mesh_names in jobs:
    kw = dict(task="causal_lm", scan_layers=scan, log=lambda *_: None)
    module, params = from_pretrained(path, **kw)  # one device
    logits, grads = run(module, params, ids, mask)
    for mesh_name in mesh_names:
        mesh = parallel.make_mesh(meshes[mesh_name])
        module, params = from_pretrained(path, mesh=mesh, **kw)
        batch = parallel.batch_sharding(mesh)
        sharded_logits, sharded_grads = run(
            module, params, jax.device_put(ids, batch), jax.device_put(mask, batch)
        )
        out[f"{name}/{mesh_name}"] = {
            "logits_diff": float(np.abs(sharded_logits - logits).max()),
            "logits_scale": float(np.abs(logits).max()),
            "grad_diff": max(float(np.abs(sharded_grads[p] - grads[p]).max()) for p in grads),
            "grad_scale": max(float(np.abs(g).max()) for g in grads.values()),
            "leaves": {
                p: {
                    "spec": [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec],
                    "shard_shape": list(x.addressable_shards[0].data.shape),
                    "mesh": dict(x.sharding.mesh.shape),
                }
                for p, x in _flatten(params).items()
            },
        }
print(json.dumps(out))
"""


class _ShardedRuns:
    """Runs the child for a whole group (FAST or SLOW) the first time one of its cases is asked."""

    def __init__(self, root):
        self.root, self.results = root, {}

    def get(self, name: str, mesh: str) -> dict:
        if (name, mesh) not in self.results:
            group = FAST if (name, mesh) in FAST else SLOW
            self.results.update(self._run(group))
        return self.results[(name, mesh)]

    def _run(self, group) -> dict:
        jobs = []
        for name in dict.fromkeys(n for n, _ in group):
            case, overrides, scan = MODELS[name]
            directory = self.root / name
            if not directory.exists():
                tiny_decoder(case, **overrides).save_pretrained(directory)
            jobs.append((name, str(directory), scan, [m for n, m in group if n == name]))
        proc = subprocess.run(
            [sys.executable, "-c", _SCRIPT, json.dumps(jobs), json.dumps(MESHES)],
            cwd=REPO,
            env=subprocess_env(8),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        return {tuple(key.split("/")): value for key, value in out.items()}


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    return _ShardedRuns(tmp_path_factory.mktemp("decoder_sharding"))


CASES = FAST + [pytest.param(*case, marks=pytest.mark.slow) for case in SLOW]


@pytest.mark.parametrize("name, mesh", CASES)
def test_sharded_logits_and_gradients_equal_one_device(sharded_runs, name, mesh):
    run = sharded_runs.get(name, mesh)
    print(f"{name} {mesh}: " + ", ".join(f"{k}={run[k]:.2g}" for k in run if k != "leaves"))
    assert run["logits_scale"] > 0.5 and run["grad_scale"] > 1e-3  # not comparing zeros
    assert run["logits_diff"] <= LOGITS_ATOL
    assert run["grad_diff"] <= GRAD_ATOL
    want_mesh = {"data": 1, "fsdp": 1, "tensor": 1, **MESHES[mesh]}
    assert all(leaf["mesh"] == want_mesh for leaf in run["leaves"].values())


# path -> (spec, per-device shard shape) the rules must give.
EXPECTED = {
    ("llama", "fsdp8"): {
        "model/layers_0/self_attn/q_proj/kernel": (["fsdp", None], [4, 32]),
        "model/layers_1/mlp/down_proj/kernel": ([None, "fsdp"], [64, 4]),
        "model/embed_tokens/embedding": ([None, "fsdp"], [128, 4]),
        "lm_head/kernel": (["fsdp", None], [4, 128]),
    },
    ("llama", "data2_tensor4"): {
        "model/layers_0/self_attn/q_proj/kernel": ([None, "tensor"], [32, 8]),
        "model/layers_0/self_attn/k_proj/kernel": ([None, None], [32, 16]),  # kv: replicated
        "model/layers_1/mlp/gate_proj/kernel": ([None, "tensor"], [32, 16]),
        "model/layers_1/mlp/down_proj/kernel": (["tensor", None], [16, 32]),
        "model/embed_tokens/embedding": (["tensor", None], [32, 32]),
        "lm_head/kernel": ([None, "tensor"], [32, 32]),
    },
    ("llama_scanned", "fsdp8"): {
        "model/layers/self_attn/q_proj/kernel": ([None, "fsdp", None], [2, 4, 32]),
        "model/layers/mlp/up_proj/kernel": ([None, "fsdp", None], [2, 4, 64]),
    },
    ("llama_scanned", "data2_tensor4"): {
        "model/layers/self_attn/o_proj/kernel": ([None, "tensor", None], [2, 8, 32]),
        "model/layers/mlp/down_proj/kernel": ([None, "tensor", None], [2, 16, 32]),
        "model/layers/post_attention_layernorm/scale": ([None, None], [2, 32]),
        "model/embed_tokens/embedding": (["tensor", None], [32, 32]),
    },
    ("gpt2_scanned", "fsdp8"): {
        "transformer/h/attn/c_attn/kernel": ([None, "fsdp", None], [2, 4, 96]),
        "transformer/wpe/embedding": ([None, "fsdp"], [64, 4]),
    },
    ("gpt2_scanned", "data2_tensor4"): {
        "transformer/h/attn/c_attn/kernel": ([None, None, "tensor"], [2, 32, 24]),
        "transformer/h/mlp/c_proj/kernel": ([None, "tensor", None], [2, 32, 32]),
    },
}


@pytest.mark.parametrize("name, mesh", CASES)
def test_parameters_load_straight_into_their_shardings(sharded_runs, name, mesh):
    leaves = sharded_runs.get(name, mesh)["leaves"]
    for path, (spec, shard_shape) in EXPECTED[(name, mesh)].items():
        assert leaves[path]["spec"] == spec, path
        assert leaves[path]["shard_shape"] == shard_shape, path
