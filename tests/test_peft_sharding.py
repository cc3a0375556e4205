"""PEFT under sharding: training on 8 fake CPU devices equals training on one.

One child python with 8 devices (`--xla_force_host_platform_device_count` is read once, when the
backend starts) trains LoRA and Houlsby adapters on a one-layer random BERT (64-wide FFN so that
"mlp" shards over tensor=4 too) for a few steps on two meshes, data=2 x tensor=4 and fsdp=8,
through the trainer itself: `pifi_jax.train.setup_run` builds the mesh, loads and places the
params, sets the state's shardings and jits the step (explicit shardings, donated state). The
shardings checked are those of the run's state, as setup_run placed them and as its step returns
them. The reference is the same initial state trained by a plain jit on one device.

Six compilations are the cost, so they are kept short: one layer, no dropout (that random bits
do not depend on sharding is tested with dropout on in tests/test_parallel.py), one bucket, and
the child's XLA backend at optimisation level 0 (the same for every mesh; partitioning is
unaffected).

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

# The sharded runs go through the trainer's own setup (pifi_jax.train.setup_run: mesh, params
# placed by the family's PARAM_AXES, state shardings, the jitted step with donated state), and
# the reference is the same initial state trained by a plain jit on one device, unsharded.
_SCRIPT = r"""
import json, sys
from pathlib import Path
import jax, numpy as np
from pifi_jax.train import optim, partition, setup_run
from pifi_jax.train.step import make_train_step
from tests.conftest import load_config

root, steps, runs = Path(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])


def specs(tree):
    return {p: [list(a) if isinstance(a, tuple) else a for a in v.sharding.spec]
            for p, v in partition.flatten(tree).items()}


def record(losses, norms, params):
    return {"loss": losses, "grad_norm": norms,
            "params": {p: np.asarray(v).tolist() for p, v in partition.flatten(params).items()}}


out = {}
for name, overrides in runs.items():
    method = name.split("/")[0]
    config = load_config("configs/classify.py:runlocal", overrides)
    run = setup_run(config, root / name.replace("/", "_"), log=lambda *_: None)
    set_by_setup = {"params": specs(run.state.params), "frozen": specs(run.state.frozen)}
    initial = jax.device_get(run.state)
    batch = next(run.train_batches.batches(0))
    key = jax.random.PRNGKey(config.seed)
    state, losses, norms = run.state, [], []
    for _ in range(steps):
        state, metrics = run.train_step(
            state, {k: jax.device_put(v, run.batch_sharding) for k, v in batch.items()},
            jax.device_put(key, run.replicated),
        )
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
    out[name] = dict(record(losses, norms, state.params), specs=set_by_setup,
                     trained_specs=specs(state.params), mesh=dict(run.batch_sharding.mesh.shape))
    if f"{method}/one" not in out:
        total = max(run.total_steps, 1)
        optimizer = optim.make_optimizer(config.optim, initial.params, total)
        step = jax.jit(make_train_step(
            run.objective, optimizer, schedule=optim.schedule_from_config(config.optim, total)
        ))
        one = jax.devices()[0]
        state, losses, norms = jax.device_put(initial, one), [], []
        for _ in range(steps):
            state, metrics = step(state, jax.device_put(batch, one), jax.device_put(key, one))
            losses.append(float(metrics["loss"]))
            norms.append(float(metrics["grad_norm"]))
        assert all(len(x.devices()) == 1 for x in jax.tree.leaves(state.params))
        out[f"{method}/one"] = record(losses, norms, state.params)
print("RESULT " + json.dumps(out))
"""
METHOD_OVERRIDES = {
    "lora": [
        "--config.peft.method=lora",
        "--config.peft.r=4",
        "--config.peft.lora_alpha=8",
        "--config.peft.target_modules=query,value,output.dense",
    ],
    "adapter_houlsby": ["--config.peft.method=adapter_houlsby", "--config.peft.bottleneck_size=8"],
}
MESH_OVERRIDES = {
    "data2_tensor4": ["--config.mesh.data=2", "--config.mesh.fsdp=1", "--config.mesh.tensor=4"],
    "fsdp8": ["--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.mesh.tensor=1"],
}
# lr 1e-2 so that a few Adam steps move every trained leaf well above PARAM_ATOL; one bucket.
TRAIN_OVERRIDES = [
    "--config.optim.lr=1e-2",
    "--config.optim.schedule=constant",
    "--config.optim.warmup_ratio=0",
    f"--config.train.num_steps={STEPS}",
    "--config.data.buckets=(16,)",
]

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
    """A one-layer random BERT (64-wide FFN, no dropout) with the tiny tokenizer of conftest."""
    import torch
    import transformers

    from tests.conftest import write_tiny_bert

    directory = write_tiny_bert(tmp_path_factory.mktemp("one_layer_bert"))
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
    transformers.BertModel(config).save_pretrained(directory)  # over the 2-layer one
    return directory


def _run_child(model_dir, task_files, root, script=None) -> dict:
    """Every method x mesh of the test through setup_run in one child python with 8 devices."""
    from tests.conftest import tiny_overrides

    runs = {
        f"{method}/{mesh}": tiny_overrides(model_dir, task_files)
        + METHOD_OVERRIDES[method]
        + MESH_OVERRIDES[mesh]
        + TRAIN_OVERRIDES
        for method in METHOD_OVERRIDES
        for mesh in MESH_OVERRIDES
    }
    env = subprocess_env(8)
    env["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
    proc = subprocess.run(
        [sys.executable, "-c", script or _SCRIPT, str(root), str(STEPS), json.dumps(runs)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def _spec(spec: list) -> list:
    """A partition spec without its trailing Nones (P() and P(None, None) are one sharding)."""
    spec = list(spec)
    while spec and spec[-1] is None:
        spec.pop()
    return spec


def test_peft_training_on_8_devices_equals_one_device(one_layer_bert, tiny_task_files, tmp_path):
    runs = _run_child(one_layer_bert, tiny_task_files, tmp_path)
    assert runs["lora/fsdp8"]["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert runs["lora/data2_tensor4"]["mesh"] == {"data": 2, "fsdp": 1, "tensor": 4}
    for name, specs in EXPECTED_SPECS.items():
        for path, spec in specs.items():
            # as setup_run placed them, and as the loop's jitted step hands them back
            assert _spec(runs[name]["specs"]["params"][path]) == _spec(spec), (name, path)
            assert _spec(runs[name]["trained_specs"][path]) == _spec(spec), (name, path)
    # LoRA factors follow their frozen kernel: lora_a its input axis, lora_b its output axis.
    for mesh in MESH_OVERRIDES:
        placed = runs[f"lora/{mesh}"]["specs"]
        kernel = placed["frozen"][f"{QUERY}/kernel"]
        assert _spec(placed["params"][f"{QUERY}/lora_a"]) == _spec([kernel[0], None]), mesh
        assert _spec(placed["params"][f"{QUERY}/lora_b"]) == _spec([None, kernel[1]]), mesh
        assert _spec(kernel), mesh  # the base kernel itself is sharded
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
