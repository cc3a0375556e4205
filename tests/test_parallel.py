"""Sharding and multi-host: the rules of pifi_jax.parallel, and sharded training that must
reproduce the single-device run.

XLA reads `--xla_force_host_platform_device_count` once, when the backend starts, so everything
that needs several devices runs in a child python (`conftest.subprocess_env`): a mesh/loading
check and whole `launch.train` runs. The pure rule checks run in this process on an
`AbstractMesh`, which has axis sizes but no devices.

What "the same run" means, and why the tolerances are what they are:
  * dropout stays on: with `jax_threefry_partitionable` (the default in this jax) random bits do
    not depend on how an array is sharded, so every run draws the same masks;
  * the one difference left is the order of floating-point reductions (a sum split across devices
    is added up in another order), a few float32 ulps per step, so loss and gradient-norm curves
    agree to `CURVE_RTOL` relative (measured: ~2e-7) and weights to `PARAM_ATOL` absolute
    (measured: < 1e-6; weights are ~0.07 and one Adam step moves them by ~lr = 1e-2, so a wrong
    or missing gradient shows up far above it);
  * accuracy and F1 count argmax predictions, which such tiny differences do not flip: equal up to
    `METRIC_ATOL`.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AbstractMesh

from pifi_jax import parallel
from pifi_jax.hub import from_pretrained
from pifi_jax.models import registry
from pifi_jax.train import partition
from tests.conftest import REPO, subprocess_env, tiny_overrides

CURVE_RTOL = 1e-5
PARAM_ATOL = 1e-5
METRIC_ATOL = 1e-6
STEPS = 6
RUN_TIMEOUT_S = 240
# lr 1e-2 (not runlocal's 1e-4) so the loss visibly moves in six steps; one bucket (32) so each
# run compiles the train step once; checkpoints every step (runlocal) exercise multi-host saving.
TRAIN_OVERRIDES = [
    f"--config.train.num_steps={STEPS}",
    "--config.train.log_every_steps=1",
    "--config.optim.lr=1e-2",
    "--config.data.buckets=(32,)",
]
# 8 fake devices; runlocal's global batch of 8 divides over every data-parallel size below.
#   data8: pure data parallelism, one example per device.
#   fsdp8: the batch over fsdp, and every "embed" dimension (32 wide) cut 8 ways: embeddings,
#     attention and MLP kernels are all sharded (4 columns/rows per device).
#   data2_tensor4: "heads" is the 32-wide q/k/v output (4 heads x 8), so q/k/v kernels and biases
#     and the attention output kernel are cut into one head per device; "mlp" (37, a prime) and
#     "vocab" (29) do not divide by 4, so the MLP and the word embeddings stay replicated.
MESHES = {
    "data8": {"data": 8, "fsdp": 1, "tensor": 1},
    "fsdp8": {"data": 1, "fsdp": 8, "tensor": 1},
    "data2_tensor4": {"data": 2, "fsdp": 1, "tensor": 4},
}
QUERY = "bert/encoder/layer_0/attention/self/query/kernel"
MLP_IN = "bert/encoder/layer_0/intermediate/dense/kernel"
# The partition spec each mesh must give these trained kernels (read back from the checkpoint).
SAVED_SPECS = {
    "data8": {QUERY: (None, None), MLP_IN: (None, None)},
    "fsdp8": {QUERY: ("fsdp", None), MLP_IN: ("fsdp", None)},
    "data2_tensor4": {QUERY: (None, "tensor"), MLP_IN: (None, None)},
}


def _abstract_mesh(data=1, fsdp=1, tensor=1) -> AbstractMesh:
    return AbstractMesh((data, fsdp, tensor), parallel.MESH_AXES)


# ---------------------------------------------------------------------------------------------
# Rules (no devices needed)


@pytest.mark.parametrize(
    "shape, message",
    [
        ({"pipeline": 2}, r"unknown mesh axes \['pipeline'\]"),
        ({"data": -1, "fsdp": -1}, "at most one mesh axis may be -1"),
        ({"data": 3, "fsdp": -1}, "8 devices cannot fill mesh"),
        ({"data": 2, "fsdp": 2}, "needs 4 devices, have 8"),
        ({"data": 16}, "needs 16 devices, have 8"),
    ],
)
def test_make_mesh_refuses_wrong_device_counts(shape, message):
    # The checks run before any Mesh is built, so placeholders stand in for 8 devices.
    with pytest.raises(ValueError, match=message):
        parallel.make_mesh(shape, devices=range(8))


def test_logical_to_spec_without_mesh_uses_each_mesh_axis_once():
    spec = parallel.logical_to_spec(("batch", "length", "embed"), parallel.DEFAULT_RULES)
    # batch takes (data, fsdp); embed would map to fsdp too, which is taken.
    assert tuple(spec) == (("data", "fsdp"), None, None)
    rules = (("a", "tensor"), ("b", "tensor"))
    assert tuple(parallel.logical_to_spec(("a", "b"), rules)) == ("tensor", None)
    assert tuple(parallel.logical_to_spec(("b", "a"), rules)) == ("tensor", None)
    assert tuple(parallel.logical_to_spec(("unknown", None), rules)) == (None, None)


def test_logical_to_spec_keeps_indivisible_dims_replicated():
    mesh = _abstract_mesh(data=2, fsdp=2, tensor=2)
    rules = parallel.DEFAULT_RULES
    assert tuple(parallel.logical_to_spec(("batch",), rules, (8,), mesh)) == (("data", "fsdp"),)
    # 6 does not divide over data x fsdp = 4: the whole dim stays replicated.
    assert tuple(parallel.logical_to_spec(("batch",), rules, (6,), mesh)) == (None,)
    assert tuple(parallel.logical_to_spec(("embed", "mlp"), rules, (32, 37), mesh)) == (
        "fsdp",
        None,
    )
    # Size-1 mesh axes are dropped, so a single remaining axis is named on its own.
    fsdp_only = _abstract_mesh(fsdp=8)
    assert tuple(parallel.logical_to_spec(("batch",), rules, (8,), fsdp_only)) == ("fsdp",)
    assert tuple(parallel.logical_to_spec(("heads",), rules, (32,), fsdp_only)) == (None,)


def test_logical_to_spec_mesh_axis_used_once_only_where_it_shards():
    mesh = _abstract_mesh(fsdp=2)
    rules = (("x", "fsdp"),)
    assert tuple(parallel.logical_to_spec(("x", "x"), rules, (4, 4), mesh)) == ("fsdp", None)
    # The first dim cannot take fsdp (odd), so the axis is still free for the second.
    assert tuple(parallel.logical_to_spec(("x", "x"), rules, (3, 4), mesh)) == (None, "fsdp")


@pytest.fixture(scope="module")
def tiny_params(tiny_bert_dir):
    module, params = from_pretrained(tiny_bert_dir, num_labels=2, log=lambda *_: None)
    return registry.family_for(module.config.model_type), partition.flatten(params)


@pytest.mark.parametrize(
    "mesh_shape, expected",
    [
        (
            {"data": 2, "fsdp": 2, "tensor": 2},
            {
                QUERY: ("fsdp", "tensor"),
                "bert/encoder/layer_0/attention/self/query/bias": ("tensor",),
                "bert/encoder/layer_0/attention/output/dense/kernel": ("tensor", "fsdp"),
                MLP_IN: ("fsdp", None),  # mlp = 37 does not divide by 2
                "bert/encoder/layer_0/intermediate/dense/bias": (None,),
                "bert/encoder/layer_0/output/dense/kernel": (None, "fsdp"),
                "bert/embeddings/word_embeddings/embedding": (None, "fsdp"),  # vocab = 29
                "bert/embeddings/position_embeddings/embedding": (None, "fsdp"),
                "bert/embeddings/LayerNorm/scale": (None,),  # no rule: replicated
                "bert/pooler/dense/kernel": (None, None),
                "classifier/kernel": (None, None),
            },
        ),
        ({"fsdp": 8}, {QUERY: ("fsdp", None), MLP_IN: ("fsdp", None)}),
        (
            {"data": 2, "tensor": 4},
            {
                QUERY: (None, "tensor"),
                "bert/encoder/layer_1/attention/self/value/bias": ("tensor",),
                MLP_IN: (None, None),
                "bert/embeddings/word_embeddings/embedding": (None, None),
            },
        ),
    ],
)
def test_param_shardings_of_the_tiny_bert(tiny_params, mesh_shape, expected):
    family, flat = tiny_params
    shardings = parallel.param_shardings(
        flat, family.PARAM_AXES, _abstract_mesh(**mesh_shape), parallel.DEFAULT_RULES
    )
    assert set(shardings) == set(flat)
    got = {path: tuple(shardings[path].spec) for path in expected}
    assert got == expected


# ---------------------------------------------------------------------------------------------
# Subprocess helpers

_MESH_SCRIPT = """
import json, sys
import jax
from pifi_jax import parallel
from pifi_jax.hub import from_pretrained
from pifi_jax.train import partition

shapes = [{"data": -1}, {"data": 2, "fsdp": -1}, {"fsdp": 2, "tensor": -1}, None]
meshes = [parallel.make_mesh(shape) for shape in shapes]
mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
_, params = from_pretrained(sys.argv[1], num_labels=2, mesh=mesh, log=lambda *_: None)
print(json.dumps({
    "device_count": jax.device_count(),
    "mesh_shapes": [dict(m.shape) for m in meshes],
    "mesh_device_ids": [[d.id for d in m.devices.flat] for m in meshes],
    "params": {
        path: {
            "spec": [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec],
            "mesh": dict(x.sharding.mesh.shape),
            "shard_shapes": sorted({tuple(s.data.shape) for s in x.addressable_shards}),
            "shards": len(x.addressable_shards),
        }
        for path, x in partition.flatten(params).items()
    },
}))
"""

_LOAD_SCRIPT = """
import sys
from ml_collections import ConfigDict
from pifi_jax.parallel import initialize_distributed

initialize_distributed(ConfigDict(dict(
    enabled=True, coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2])
)))
from pifi_jax.hub import CheckpointReader

reader = CheckpointReader(sys.argv[3])
print(reader.get(reader.keys()[0]).shape)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


@dataclasses.dataclass
class _Proc:
    name: str
    log: Path
    popen: subprocess.Popen

    def failure(self) -> str | None:
        if self.popen.returncode == 0:
            return None
        return f"{self.name} exited with {self.popen.returncode}; log tail:\n{_tail(self.log)}"


def _start(name: str, argv: list[str], devices: int, log: Path) -> _Proc:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        popen = subprocess.Popen(
            [sys.executable, *argv],
            cwd=REPO,
            env=subprocess_env(devices, quick_compile=True),  # compared with each other only
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return _Proc(name, log, popen)


def _wait(procs: list[_Proc], timeout: float, *, all_or_none: bool) -> None:
    """Waits for `procs`; kills what is still running at the timeout, and, when they only work
    together (one multi-process run), all of them as soon as one fails."""
    deadline = time.monotonic() + timeout
    try:
        while any(p.popen.poll() is None for p in procs) and time.monotonic() < deadline:
            if all_or_none and any(p.popen.returncode not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.popen.poll() is None:
                p.popen.kill()
                p.popen.wait()
                with open(p.log, "a") as out:
                    out.write(f"\n[killed by the test after {timeout:.0f} s or a peer's failure]\n")


def _train_argv(model_dir: Path, files: dict, workdir: Path, mesh: dict) -> list[str]:
    return [
        "-m",
        "launch.train",
        f"--config={REPO / 'configs' / 'classify.py'}:runlocal",
        *tiny_overrides(model_dir, files),
        *TRAIN_OVERRIDES,
        *(f"--config.mesh.{axis}={size}" for axis, size in mesh.items()),
        f"--workdir={workdir}",
    ]


def _distributed_flags(port: int, process_id: int) -> list[str]:
    return [
        "--config.distributed.enabled=True",
        f"--config.distributed.coordinator_address=127.0.0.1:{port}",
        "--config.distributed.num_processes=2",
        f"--config.distributed.process_id={process_id}",
    ]


@dataclasses.dataclass
class _History:
    train: dict[str, np.ndarray]  # per logged step: train/loss, train/grad_norm, ...
    train_steps: list[int]
    evals: list[dict]  # the validation rows written during training
    results: dict  # results.json


def _history(workdir: Path) -> _History:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    keys = ("train/loss", "train/grad_norm", "train/accuracy", "train/lr")
    return _History(
        train={k: np.array([r[k] for r in train_rows]) for k in keys},
        train_steps=[r["step"] for r in train_rows],
        evals=[r for r in rows if "validation/accuracy" in r],
        results=json.loads((workdir / "results.json").read_text()),
    )


def _checkpoint(workdir: Path) -> Path:
    return workdir / "checkpoints" / str(STEPS) / "state"


def _saved_params_metadata(workdir: Path) -> dict:
    """{path: orbax ArrayMetadata} of the last checkpoint's parameters (shape, sharding, ...)."""
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.metadata(_checkpoint(workdir)).item_metadata.tree
    return partition.flatten(tree["params"])


def _final_state(workdir: Path) -> dict:
    """The last checkpoint's state, restored onto this process's first device."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(_checkpoint(workdir)).item_metadata.tree
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata
        )
        return checkpointer.restore(_checkpoint(workdir), target)


def _assert_same_training(workdir: Path, reference: Path, label: str) -> dict[str, float]:
    """Asserts that the run in `workdir` reproduces `reference`; returns the largest differences."""
    got, want = _history(workdir), _history(reference)
    assert got.train_steps == want.train_steps == list(range(1, STEPS + 1)), label
    diffs = {}
    for key in ("train/loss", "train/grad_norm", "train/lr"):
        relative = np.abs(got.train[key] - want.train[key]) / np.maximum(
            np.abs(want.train[key]), 1e-30
        )
        diffs[key] = float(np.max(relative))
        np.testing.assert_allclose(
            got.train[key], want.train[key], rtol=CURVE_RTOL, err_msg=f"{label}: {key}"
        )
    np.testing.assert_allclose(
        got.train["train/accuracy"], want.train["train/accuracy"], atol=METRIC_ATOL
    )
    assert [r["step"] for r in got.evals] == [r["step"] for r in want.evals], label
    for mine, theirs in zip(got.evals, want.evals, strict=True):
        for key, value in theirs.items():
            assert mine[key] == pytest.approx(value, abs=METRIC_ATOL), f"{label}: {key}"
    for key, value in want.results.items():
        if key.startswith(("validation/", "test/")):
            assert got.results[key] == pytest.approx(value, abs=METRIC_ATOL), f"{label}: {key}"

    mine, theirs = _final_state(workdir), _final_state(reference)
    assert int(mine["step"]) == int(theirs["step"]) == STEPS
    flat_mine, flat_theirs = partition.flatten(mine["params"]), partition.flatten(theirs["params"])
    assert set(flat_mine) == set(flat_theirs)
    param_diff = {p: float(np.max(np.abs(flat_mine[p] - flat_theirs[p]))) for p in flat_mine}
    worst = max(param_diff, key=param_diff.get)
    diffs["params"] = param_diff[worst]
    assert diffs["params"] <= PARAM_ATOL, f"{label}: {worst} differs by {diffs['params']:.3g}"
    return diffs


# ---------------------------------------------------------------------------------------------
# Meshes on 8 fake devices


def test_make_mesh_and_loading_on_8_devices(tiny_bert_dir, tmp_path):
    proc = _start("mesh check", ["-c", _MESH_SCRIPT, str(tiny_bert_dir)], 8, tmp_path / "mesh.log")
    _wait([proc], RUN_TIMEOUT_S, all_or_none=True)
    assert proc.failure() is None, proc.failure()
    out = json.loads(proc.log.read_text().strip().splitlines()[-1])
    assert out["device_count"] == 8
    assert out["mesh_shapes"] == [
        {"data": 8, "fsdp": 1, "tensor": 1},
        {"data": 2, "fsdp": 4, "tensor": 1},
        {"data": 1, "fsdp": 2, "tensor": 4},
        {"data": 8, "fsdp": 1, "tensor": 1},  # no shape: all devices data-parallel
    ]
    assert all(ids == list(range(8)) for ids in out["mesh_device_ids"])
    # from_pretrained(mesh=...) puts every tensor straight into its sharding.
    params = out["params"]
    assert all(
        p["shards"] == 8 and p["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
        for p in params.values()
    )
    assert params[QUERY]["spec"] == ["fsdp", "tensor"]
    assert params[QUERY]["shard_shapes"] == [[16, 16]]
    assert params[MLP_IN]["spec"] == ["fsdp", None]
    assert params[MLP_IN]["shard_shapes"] == [[16, 37]]
    assert params["classifier/kernel"]["shard_shapes"] == [[32, 2]]


class _TrainingRuns:
    """The single-device run and one run per mesh in MESHES, started a pair at a time on first
    demand (the machine this suite targets has two cores and each run is mostly one compiling
    thread), so no single test waits for more than one pair."""

    PAIRS = (("single", "data2_tensor4"), ("data8", "fsdp8"))  # the default run needs the first

    def __init__(self, root: Path, model_dir: Path, files: dict):
        self.root, self.model_dir, self.files = root, model_dir, files
        self.failures: dict[str, str | None] = {}

    def workdir(self, name: str) -> Path:
        if name not in self.failures:
            pair = next(p for p in self.PAIRS if name in p)
            procs = [
                _start(
                    run,
                    _train_argv(self.model_dir, self.files, self.root / run, self._mesh(run)),
                    1 if run == "single" else 8,
                    self.root / f"{run}.log",
                )
                for run in pair
            ]
            _wait(procs, RUN_TIMEOUT_S, all_or_none=False)
            self.failures.update({p.name: p.failure() for p in procs})
        assert self.failures[name] is None, self.failures[name]
        return self.root / name

    @staticmethod
    def _mesh(name: str) -> dict:
        return {"data": 1, "fsdp": 1, "tensor": 1} if name == "single" else MESHES[name]


@pytest.fixture(scope="module")
def training_runs(tiny_bert_dir, tiny_task_files, tmp_path_factory) -> _TrainingRuns:
    return _TrainingRuns(tmp_path_factory.mktemp("parallel_runs"), tiny_bert_dir, tiny_task_files)


@pytest.mark.parametrize(
    "mesh_name",
    # data8 and fsdp8 (one pair of runs, 40 s) in the slow run; data parallelism is also in
    # data2_tensor4, and decoder fsdp in test_decoder_sharding.
    [pytest.param(m, marks=pytest.mark.slow) if m != "data2_tensor4" else m for m in MESHES],
)
def test_sharded_training_equals_single_device(training_runs, mesh_name):
    workdir = training_runs.workdir(mesh_name)
    diffs = _assert_same_training(workdir, training_runs.workdir("single"), mesh_name)
    print(f"{mesh_name} vs single device, largest differences: {diffs}")
    # The trained state really was sharded as the rules say (orbax records each array's spec).
    saved = _saved_params_metadata(workdir)
    for path, spec in SAVED_SPECS[mesh_name].items():
        leaf = saved[path]
        assert tuple(leaf.sharding.partition_spec) == spec, path
        assert list(leaf.sharding.shape) == [MESHES[mesh_name][a] for a in parallel.MESH_AXES]


# ---------------------------------------------------------------------------------------------
# Two processes on localhost


@pytest.mark.slow  # 62 s: two processes on localhost
def test_two_processes_equal_one_process_with_8_devices(
    training_runs, tiny_bert_dir, tiny_task_files, tmp_path
):
    # Two processes x 4 fake devices form one 8-device mesh (data=8, as in the "data8" run; with
    # no distributed start each process would have 4 devices and make_mesh would refuse data=8).
    # Each process feeds its half of every global batch; both write checkpoints into the SAME
    # workdir, as hosts sharing a filesystem do: orbax coordinates that through the
    # jax.distributed client (process 0 makes the directories, each process writes its own
    # shards, the commit waits for all). Cross-process collectives on CPU use gloo, the default
    # of jax_cpu_collectives_implementation in this jax, so nothing needs configuring.
    port = _free_port()
    workdir = tmp_path / "run"
    procs = [
        _start(
            f"process {i}",
            _train_argv(tiny_bert_dir, tiny_task_files, workdir, MESHES["data8"])
            + _distributed_flags(port, i),
            4,
            tmp_path / f"process_{i}.log",
        )
        for i in range(2)
    ]
    _wait(procs, RUN_TIMEOUT_S, all_or_none=True)
    failures = [p.failure() for p in procs if p.failure()]
    assert not failures, "\n\n".join(failures)
    reference = training_runs.workdir("data8")
    diffs = _assert_same_training(workdir, reference, "2 processes x 4 devices")
    print(f"2 processes vs 1 process (8 devices), largest differences: {diffs}")


def test_loading_safetensors_in_two_processes(tiny_bert_dir, tmp_path):
    address = f"127.0.0.1:{_free_port()}"
    procs = [
        _start(
            f"process {i}",
            ["-c", _LOAD_SCRIPT, address, str(i), str(tiny_bert_dir)],
            1,
            tmp_path / f"load_{i}.log",
        )
        for i in range(2)
    ]
    _wait(procs, RUN_TIMEOUT_S, all_or_none=True)
    failures = [p.failure() for p in procs if p.failure()]
    # Each process must read tensors onto its own CPU device (a read onto process 0's device
    # fails in process 1 with "spans non-addressable devices").
    assert not failures, "\n\n".join(failures)
