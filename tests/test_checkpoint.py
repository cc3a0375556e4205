"""Checkpoint round trips, retention, best tracking, and atomicity under SIGKILL."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pifi_jax.train.checkpoint import Checkpointer


def _train_state(seed=0):
    key = jax.random.PRNGKey(seed)
    params = {
        "dense": {"kernel": jax.random.normal(key, (4, 3)), "bias": jnp.arange(3.0)},
        "LayerNorm": {"scale": jnp.ones(3)},
    }
    tx = optax.adamw(1e-2, weight_decay=0.1, mask=lambda p: jax.tree.map(lambda _: True, p))
    opt_state = tx.init(params)
    for _ in range(2):  # non-trivial moments and count
        grads = jax.tree.map(lambda x: jnp.sin(x) + 0.5, params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    state = {"step": jnp.int32(7), "params": params, "opt_state": opt_state, "rng": key}
    return state, tx


def _abstract(tx, state):
    def build():
        params = jax.tree.map(jnp.zeros_like, state["params"])
        return {
            "step": jnp.int32(0),
            "params": params,
            "opt_state": tx.init(params),
            "rng": jax.random.PRNGKey(0),
        }

    return jax.eval_shape(build)


def _assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_of_an_adamw_state_is_bitwise(tmp_path):
    state, tx = _train_state()
    meta = {"epoch": 1, "batch": 42, "metrics": {"loss": np.float32(0.25)}, "patience": 0}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(7, state, meta)
        assert ckpt.latest_step() == 7

    with Checkpointer(tmp_path) as ckpt:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
            _abstract(tx, state),
        )
        restored, restored_meta = ckpt.restore(abstract)
    _assert_bitwise_equal(restored, state)
    assert type(restored["opt_state"][0]).__name__ == "ScaleByAdamState"
    assert restored["opt_state"][0].count.dtype == jnp.int32
    assert all(leaf.sharding == sharding for leaf in jax.tree.leaves(restored))
    assert restored_meta == {"epoch": 1, "batch": 42, "metrics": {"loss": 0.25}, "patience": 0}


def test_max_to_keep_and_restore_of_an_older_step(tmp_path):
    state, tx = _train_state()
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        for step in range(1, 5):
            ckpt.save(step, {**state, "step": jnp.int32(step)}, {"step": step})
        assert ckpt.all_steps() == [3, 4]
        restored, meta = ckpt.restore(_abstract(tx, state), step=3)
    assert int(restored["step"]) == 3 and meta == {"step": 3}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["3", "4"]


def test_an_old_step_is_skipped_and_never_overwritten(tmp_path):
    state, tx = _train_state()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(5, state, {"version": 1})
        ckpt.save(5, state, {"version": 2})
        ckpt.save(4, state, {"version": 3})
        assert ckpt.all_steps() == [5]
        assert ckpt.restore(_abstract(tx, state))[1] == {"version": 1}


def test_restore_without_checkpoint_is_an_error(tmp_path):
    state, tx = _train_state()
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() is None
        with pytest.raises(FileNotFoundError):
            ckpt.restore(_abstract(tx, state))


@pytest.mark.parametrize(
    "mode, values, expected_best",
    [
        ("max", [0.5, 0.4, 0.7, 0.7, 0.6], [True, False, True, False, False]),
        ("min", [0.5, 0.4, 0.7, 0.3, float("nan")], [True, True, False, True, False]),
    ],
)
def test_best_keeps_only_the_best(tmp_path, mode, values, expected_best):
    state, tx = _train_state()
    ckpt = Checkpointer(tmp_path, best_metric="score", best_mode=mode)
    got = []
    for i, value in enumerate(values):
        step_state = {**state, "step": jnp.int32(10 * (i + 1))}
        got.append(ckpt.save_best(10 * (i + 1), step_state, {"score": value, "loss": 1.0}))
    assert got == expected_best
    best_index = max(i for i, better in enumerate(got) if better)
    assert len([p for p in (tmp_path / "best").iterdir() if p.name.isdigit()]) == 1

    restored, meta = ckpt.restore_best(_abstract(tx, state))
    assert int(restored["step"]) == meta["step"] == 10 * (best_index + 1)
    assert meta["metrics"]["score"] == values[best_index]
    # The best directory is not mistaken for a step of the main sequence.
    assert ckpt.latest_step() is None
    ckpt.close()

    # A new Checkpointer on the same directory remembers the best value.
    reopened = Checkpointer(tmp_path, best_metric="score", best_mode=mode)
    worse = values[best_index] - 1 if mode == "max" else values[best_index] + 1
    assert not reopened.save_best(99, state, {"score": worse})
    reopened.close()


def test_best_needs_best_metric(tmp_path):
    state, _ = _train_state()
    with Checkpointer(tmp_path) as ckpt, pytest.raises(ValueError, match="best_metric"):
        ckpt.save_best(1, state, {"score": 1.0})
    with Checkpointer(tmp_path, best_metric="f1") as ckpt, pytest.raises(ValueError, match="'f1'"):
        ckpt.save_best(1, state, {"score": 1.0})


# About 200 MB, so that the save at step 2 is still being written when it is killed.
_BIG = 50_000_000

_SAVE_STEP_2 = textwrap.dedent(
    f"""
    import sys
    import jax.numpy as jnp
    from pifi_jax.train.checkpoint import Checkpointer

    ckpt = Checkpointer(sys.argv[1])
    big = jnp.full(({_BIG},), 2.0, jnp.float32)
    print("saving", flush=True)
    ckpt.save(2, {{"big": big, "step": jnp.int32(2)}}, {{"step": 2}})
    print("saved", flush=True)
    """
)


def _abstract_big():
    return {
        "big": jax.ShapeDtypeStruct((_BIG,), jnp.float32),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
    }


def _tmp_dirs(directory: Path):
    return [p for p in directory.iterdir() if ".orbax-checkpoint-tmp" in p.name]


def test_kill_during_save_leaves_previous_checkpoint_restorable(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"big": jnp.full((_BIG,), 1.0), "step": jnp.int32(1)}, {"step": 1})

    repo_root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{repo_root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.Popen(
        [sys.executable, "-c", _SAVE_STEP_2, str(tmp_path)], env=env, stdout=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 60
        while not _tmp_dirs(tmp_path) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    if (tmp_path / "2").exists() or not _tmp_dirs(tmp_path):
        pytest.skip("the save finished before it could be killed")

    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 1
        restored, meta = ckpt.restore(_abstract_big())
    assert meta == {"step": 1} and int(restored["step"]) == 1
    assert bool(jnp.all(restored["big"] == 1.0))
    assert not _tmp_dirs(tmp_path)  # the half-written step 2 was cleaned up


def test_leftover_temporary_directory_is_ignored(tmp_path):
    state, tx = _train_state()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, {"step": 1})
    leftover = tmp_path / "2.orbax-checkpoint-tmp-1234567890"
    (leftover / "state").mkdir(parents=True)
    (leftover / "state" / "junk").write_bytes(b"\0" * 100)

    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 1
        restored, meta = ckpt.restore(_abstract(tx, state))
        _assert_bitwise_equal(restored, state)
        ckpt.save(2, state, {"step": 2})
        assert ckpt.all_steps() == [1, 2]
