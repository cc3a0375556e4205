"""Checkpoint round trips, retention, best tracking, and atomicity under SIGKILL."""

import os
import signal
import subprocess
import sys
import textwrap
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


# A few MB: the state's array data is a real file, not inlined in orbax's index.
_BIG = 1_000_000

# The child saves step 1, then dies by SIGKILL from inside orbax's write path while it saves step
# 2: at the commit of the step directory (every file written, the rename not done), or while the
# meta item is written (the state item possibly still in flight).
_KILLED_IN_SAVE = textwrap.dedent(
    f"""
    import os, signal, sys
    import jax.numpy as jnp
    from orbax.checkpoint._src.handlers import json_checkpoint_handler
    from orbax.checkpoint._src.path import atomicity
    from pifi_jax.train.checkpoint import Checkpointer

    ckpt = Checkpointer(sys.argv[1])
    ckpt.save(1, {{"big": jnp.full(({_BIG},), 1.0), "step": jnp.int32(1)}}, {{"step": 1}})
    print("saved 1", flush=True)

    def die(*args, **kwargs):
        print("killed", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    if sys.argv[2] == "commit":
        finalize = atomicity.AtomicRenameTemporaryPath.finalize

        async def commit(self, *args, **kwargs):
            if self._final_path.name == "2":
                die()
            return await finalize(self, *args, **kwargs)

        atomicity.AtomicRenameTemporaryPath.finalize = commit
    else:

        async def write_meta(self, *args, **kwargs):
            die()

        json_checkpoint_handler.JsonCheckpointHandler._save_fn = write_meta
    ckpt.save(2, {{"big": jnp.full(({_BIG},), 2.0), "step": jnp.int32(2)}}, {{"step": 2}})
    print("saved 2", flush=True)
    """
)


def _abstract_big():
    return {
        "big": jax.ShapeDtypeStruct((_BIG,), jnp.float32),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
    }


def _tmp_dirs(directory: Path):
    return [p for p in directory.iterdir() if ".orbax-checkpoint-tmp" in p.name]


@pytest.mark.parametrize("moment", ["commit", "meta"])
def test_kill_during_save_leaves_previous_checkpoint_restorable(tmp_path, moment):
    repo_root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{repo_root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_IN_SAVE, str(tmp_path), moment],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    assert child.stdout.split() == ["saved", "1", "killed"]
    assert not (tmp_path / "2").exists() and _tmp_dirs(tmp_path)  # step 2 half-written

    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 1
        restored, meta = ckpt.restore(_abstract_big())
        assert meta == {"step": 1} and int(restored["step"]) == 1
        assert bool(jnp.all(restored["big"] == 1.0))
        ckpt.save(2, {"big": jnp.full((_BIG,), 2.0), "step": jnp.int32(2)}, {"step": 2})
        assert ckpt.all_steps() == [1, 2]
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


def _state_of(step: int):
    """Random (hardly compressible) data: the largest file of the step is its array data."""
    big = jax.random.normal(jax.random.PRNGKey(step), (_BIG,), jnp.float32)
    return {"big": big, "step": jnp.int32(step)}


def _flip_a_bit(step_dir: Path):
    """One bit of the array data flipped: orbax and tensorstore read it back without error."""
    path = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_damaged_latest_step_falls_back_to_the_previous_one(tmp_path, caplog):
    with Checkpointer(tmp_path, max_to_keep=3) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, _state_of(step), {"step": step})
    _flip_a_bit(tmp_path / "3" / "state")
    (tmp_path / "2" / "meta" / "metadata").write_text('{"st')  # truncated JSON

    with Checkpointer(tmp_path, max_to_keep=3, read_only=True) as ckpt:  # a reader moves nothing
        with pytest.raises(ValueError, match=f"checkpoint {tmp_path / '3'} is corrupted"):
            ckpt.restore(_abstract_big(), step=3)  # an explicit step does not fall back
        assert ckpt.restore(_abstract_big())[1] == {"step": 1}
    assert ckpt.all_steps() == [1, 2, 3]

    with caplog.at_level("WARNING"), Checkpointer(tmp_path, max_to_keep=3) as ckpt:
        restored, meta = ckpt.restore(_abstract_big())
        assert meta == {"step": 1}
        _assert_bitwise_equal(restored, _state_of(1))
        assert ckpt.all_steps() == [1]  # the damaged steps moved aside: they may be saved again
        ckpt.save(2, _state_of(2), {"step": 2})
        assert ckpt.restore(_abstract_big())[1] == {"step": 2}
    warning = "\n".join(r.getMessage() for r in caplog.records)
    assert "step 3, 2 unreadable, restored step 1 instead" in warning
    assert (
        f"{tmp_path / '3'} is corrupted" in warning
        and f"{tmp_path / '2'} cannot be read" in warning
    )
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "corrupted").iterdir()) == ["2", "3"]


def test_no_usable_step_is_an_error_naming_each(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        for step in (1, 2):
            ckpt.save(step, _state_of(step), {"step": step})
    for step in (1, 2):
        _flip_a_bit(tmp_path / str(step) / "state")
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(ValueError, match="no usable checkpoint") as info:
            ckpt.restore(_abstract_big())
        assert ckpt.all_steps() == [1, 2]  # nothing moved when nothing could be restored
    assert str(tmp_path / "1") in str(info.value) and str(tmp_path / "2") in str(info.value)


def test_a_failed_save_names_the_step_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    from orbax.checkpoint._src.path import atomicity

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def disk_full(self, *args, **kwargs):
        if self._final_path.name == "2":
            raise OSError(errno.ENOSPC, "No space left on device", str(self.get()))
        return await finalize(self, *args, **kwargs)

    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, _state_of(1), {"step": 1})
        monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", disk_full)
        with pytest.raises(OSError, match=f"saving checkpoint 2 in {tmp_path} failed") as info:
            ckpt.save(2, _state_of(2), {"step": 2})
        assert info.value.errno == errno.ENOSPC
        assert "the latest complete checkpoint there is still 1" in str(info.value)
        assert ckpt.latest_step() == 1
    monkeypatch.undo()
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.restore(_abstract_big())[1] == {"step": 1}


def test_has_checkpoints(tmp_path):
    from pifi_jax.train.checkpoint import has_checkpoints

    assert not has_checkpoints(tmp_path / "missing")
    (tmp_path / "best").mkdir()
    (tmp_path / "corrupted").mkdir()
    assert not has_checkpoints(tmp_path)
    (tmp_path / "best" / "0").mkdir()
    assert has_checkpoints(tmp_path)
    (tmp_path / "best" / "0").rmdir()
    (tmp_path / "3.orbax-checkpoint-tmp").mkdir()  # a first save, killed: the run had trained
    assert has_checkpoints(tmp_path)
