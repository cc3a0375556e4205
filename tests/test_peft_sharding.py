"""PEFT under sharding: training on 8 fake CPU devices equals training on one.

One child python with 8 devices (`--xla_force_host_platform_device_count` is read once, when the
backend starts) trains LoRA and Houlsby adapters on a one-layer random BERT (64-wide FFN so that
"mlp" shards over tensor=4 too) for a few steps on three meshes: one device (the reference),
data=2 x tensor=4, and fsdp=8. It uses what the trainer uses: `from_pretrained(mesh=...)`,
`parallel.param_shardings` with the family's PARAM_AXES, `make_train_step` jitted with explicit
shardings and donated state.

Six compilations are the cost, so they are kept short: one layer, no dropout (that random bits
do not depend on sharding is tested with dropout on in tests/test_parallel.py), and the child's
XLA backend at optimisation level 0 (the same for every mesh; partitioning is unaffected).

What is compared, and why the tolerances (as in tests/test_parallel.py): the only difference left
between meshes is the order of floating-point reductions, a few float32 ulps per step. Losses and
gradient norms agree to CURVE_RTOL relative, trained leaves to PARAM_ATOL absolute (measured:
< 2e-7; weights ~0.1, and one Adam step at lr 1e-2 moves them ~1e-2, so a wrong or missing
gradient would show far above it).

Shardings chosen for PEFT leaves (pifi_jax/parallel.py): LoRA factors follow their kernel (the rank
replicated); adapter down/up kernels shard their hidden-size side like the residual stream
("embed": over fsdp), the bottleneck whole; prefix/prompt tables are replicated.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, subprocess_env

CURVE_RTOL = 1e-5
PARAM_ATOL = 1e-5
STEPS = 3
TIMEOUT_S = 300

_SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np, optax
from pifi_jax.train.objectives import Classification
from pifi_jax import parallel, peft
from pifi_jax.hub import from_pretrained
from pifi_jax.models import registry
from pifi_jax.train import partition
from pifi_jax.train.step import TrainState, make_train_step

model_dir, steps = sys.argv[1], int(sys.argv[2])
METHODS = {
    "lora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=("query", "value", "output.dense")),
    "adapter_houlsby": peft.AdapterConfig(kind="houlsby", bottleneck_size=8),
}
MESHES = {
    "one": ({"data": 1}, jax.devices()[:1]),
    "data2_tensor4": ({"data": 2, "tensor": 4}, None),
    "fsdp8": ({"fsdp": 8}, None),
}
rng = np.random.default_rng(0)
ids = rng.integers(5, 29, size=(8, 16)).astype(np.int32)
mask = (np.arange(16)[None, :] < rng.integers(6, 17, size=(8, 1))).astype(np.int32)
batch = {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
         "labels": rng.integers(0, 2, size=8).astype(np.int32), "weights": np.ones(8, np.float32)}

out = {}
for method, config in METHODS.items():
    for mesh_name, (shape, devices) in MESHES.items():
        mesh = parallel.make_mesh(shape, devices)
        module, params = from_pretrained(
            model_dir, num_labels=2, mesh=mesh, peft=config, log=lambda *_: None
        )
        family = registry.family_for(module.config.model_type)
        flat = partition.flatten(params)
        param_sh = parallel.param_shardings(flat, family.PARAM_AXES, mesh)
        params = partition.unflatten({p: jax.device_put(v, param_sh[p]) for p, v in flat.items()})
        trainable, frozen = partition.split_params(params, peft.trainable_rules(module, params))
        optimizer = optax.adamw(1e-2)
        state = TrainState.create(trainable, frozen, optimizer)
        repl = parallel.replicated(mesh)
        trainable_sh = partition.unflatten({p: param_sh[p] for p in partition.flatten(trainable)})
        state_sh = TrainState(
            step=repl,
            params=trainable_sh,
            frozen=partition.unflatten({p: param_sh[p] for p in partition.flatten(frozen)}),
            opt_state=optax.tree_map_params(
                optimizer, lambda _, s: s, state.opt_state, trainable_sh,
                transform_non_params=lambda _: repl,
            ),
        )
        state = jax.device_put(state, state_sh)
        batch_sh = parallel.batch_sharding(mesh)
        step = jax.jit(
            make_train_step(Classification(module, 2), optimizer),
            in_shardings=(state_sh, batch_sh, repl),
            out_shardings=(state_sh, repl),
            donate_argnums=0,
        )
        global_batch = {k: jax.device_put(v, batch_sh) for k, v in batch.items()}
        key = jax.device_put(jax.random.PRNGKey(0), repl)
        losses, norms = [], []
        for _ in range(steps):
            state, metrics = step(state, global_batch, key)
            losses.append(float(metrics["loss"]))
            norms.append(float(metrics["grad_norm"]))
        trained = partition.flatten(state.params)
        out[f"{method}/{mesh_name}"] = {
            "loss": losses,
            "grad_norm": norms,
            "params": {p: np.asarray(v).tolist() for p, v in trained.items()},
            "specs": {p: [list(a) if isinstance(a, tuple) else a for a in v.sharding.spec]
                      for p, v in trained.items()},
        }
print("RESULT " + json.dumps(out))
"""

QUERY = "bert/encoder/layer_0/attention/self/query"
ADAPTER = "bert/encoder/layer_0/output"
# The partition specs these PEFT leaves keep through training (out_shardings of the step).
EXPECTED_SPECS = {
    "lora/data2_tensor4": {
        f"{QUERY}/lora_a": [None, None],
        f"{QUERY}/lora_b": [None, "tensor"],
        f"{ADAPTER}/dense/lora_a": ["tensor", None],  # FFN output: its input axis is "mlp"
    },
    "lora/fsdp8": {f"{QUERY}/lora_a": ["fsdp", None], f"{QUERY}/lora_b": [None, None]},
    "adapter_houlsby/data2_tensor4": {f"{ADAPTER}/adapter_down/kernel": [None, None]},
    "adapter_houlsby/fsdp8": {
        f"{ADAPTER}/adapter_down/kernel": ["fsdp", None],
        f"{ADAPTER}/adapter_up/kernel": [None, "fsdp"],
        f"{ADAPTER}/adapter_up/bias": ["fsdp"],
        f"{ADAPTER}/adapter_down/bias": [None],
    },
}


@pytest.fixture(scope="module")
def one_layer_bert(tmp_path_factory):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=29,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    directory = tmp_path_factory.mktemp("one_layer_bert")
    transformers.BertModel(config).save_pretrained(directory)
    return directory


def test_peft_training_on_8_devices_equals_one_device(one_layer_bert):
    env = subprocess_env(8)
    env["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(one_layer_bert), str(STEPS)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    runs = json.loads(line[len("RESULT ") :])
    for name, specs in EXPECTED_SPECS.items():
        for path, spec in specs.items():
            assert runs[name]["specs"][path] == spec, (name, path)
    diffs = {}
    for method in ("lora", "adapter_houlsby"):
        reference = runs[f"{method}/one"]
        assert reference["loss"][-1] < reference["loss"][0]  # it trains
        for mesh in ("data2_tensor4", "fsdp8"):
            run = runs[f"{method}/{mesh}"]
            for key in ("loss", "grad_norm"):
                np.testing.assert_allclose(
                    run[key], reference[key], rtol=CURVE_RTOL, err_msg=f"{method}/{mesh} {key}"
                )
            assert run["params"].keys() == reference["params"].keys()
            diffs[f"{method}/{mesh}"] = max(
                float(np.max(np.abs(np.asarray(v) - np.asarray(reference["params"][p]))))
                for p, v in run["params"].items()
            )
            for path, value in run["params"].items():
                np.testing.assert_allclose(
                    np.asarray(value),
                    np.asarray(reference["params"][path]),
                    atol=PARAM_ATOL,
                    err_msg=f"{method}/{mesh} {path}",
                )
    print("largest trained-leaf differences from one device:", diffs)
