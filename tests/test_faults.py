"""Faults of a run and what the trainer does about them: a NaN or infinite step (stop or skip,
plain, accumulated and IST steps), an unwritable workdir, a full disk during a save, a damaged
latest checkpoint at resume, and a resume with another config. Faults are injected: a batch whose
row weights are NaN (the objective's weighted loss and its gradients become NaN), an OSError from
inside orbax's commit of a step directory, and bytes cut from or flipped in a saved file."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from orbax.checkpoint._src.path import atomicity

from configs.classify import get_config
from pifi_jax.train import Checkpointer, loop, objectives, train_and_evaluate
from tests.conftest import load_config, run_crashing_after, write_tiny_decoder

STEPS = 4


def _quiet(*_):
    pass


def _config(model_dir, files, **train):
    """configs/classify.py:runlocal on the tiny model and task, STEPS steps, a checkpoint at every
    step, validation every 2, train metrics at every step; `train` overrides config.train."""
    config = get_config("runlocal")
    config.model.path = str(model_dir)
    config.task = "sst2"
    config.data.source = "local"
    for split, path in files.items():
        config.data.data_files[split] = str(path)
    config.train.num_steps = STEPS
    config.train.log_every_steps = 1
    config.train.compilation_cache = False
    for key, value in train.items():
        config.train[key] = value
    return config


def _poisoning(monkeypatch, calls: set[int]):
    """Runs after this feed infinite row weights (a weighted mean of inf / inf: a NaN loss and NaN
    gradients) to the train steps of these call indices (0-based, counted from the start of each
    train_and_evaluate)."""
    setup = loop.setup_run
    real_global = loop._global

    def poisoning_setup(*args, **kwargs):
        run = setup(*args, **kwargs)
        step, count = run.train_step, [0]

        def train_step(state, batch, rng):
            if count[0] in calls:
                weights = np.full(batch["weights"].shape, np.inf, np.float32)
                batch = {**batch, "weights": real_global({"w": weights}, run.batch_sharding)["w"]}
            count[0] += 1
            return step(state, batch, rng)

        run.train_step = train_step
        return run

    monkeypatch.setattr(loop, "setup_run", poisoning_setup)


def _host(tree) -> dict[str, np.ndarray]:
    return {
        jax.tree_util.keystr(path): np.array(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
    }


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key


def _saved(workdir: Path, step: int | None = None):
    with Checkpointer(workdir / "checkpoints", read_only=True) as ckpt:
        return ckpt.restore(None, step=step)


def _records(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tiny_bert_dir, tiny_task_files, tmp_path_factory) -> Path:
    """The run that the resumed ones must end equal to."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    train_and_evaluate(_config(tiny_bert_dir, tiny_task_files), workdir)
    return workdir


def _assert_ends_as(workdir: Path, reference: Path):
    state, meta = _saved(workdir)
    state_ref, meta_ref = _saved(reference)
    assert int(state["step"]) == STEPS and meta == meta_ref
    _assert_same(_host(state), _host(state_ref))
    results = json.loads((workdir / "results.json").read_text())
    expected = json.loads((reference / "results.json").read_text())
    for key, value in expected.items():
        if "/" in key:
            assert results[key] == value, key


# ---------------------------------------------------------------------------------------------
# NaN / inf steps


@pytest.mark.parametrize(
    "accum, weight, loss_finite",
    [
        pytest.param(1, np.inf, False, marks=pytest.mark.slow),
        (2, np.inf, False),
        pytest.param(1, np.nan, True, marks=pytest.mark.slow),
    ],
    ids=["inf-weights", "inf-weights-in-one-micro-batch", "nan-weights-finite-loss-nan-grads"],
)
def test_a_skipped_step_leaves_params_and_optimizer_state_unchanged(
    tiny_bert_dir, tiny_task_files, tmp_path, accum, weight, loss_finite
):
    """In the jitted step: a non-finite loss or gradient (with accumulation: from one micro-batch
    only) leaves params, Adam's moments and its count bitwise as they were; step still counts;
    the next good batch updates. NaN weights are masked out of the loss (0) but not out of its
    gradient: the gradient norm alone catches them."""
    config = _config(tiny_bert_dir, tiny_task_files, nonfinite="skip", grad_accum_steps=accum)
    run = loop.setup_run(config, tmp_path, log=_quiet)
    run.checkpointer.close()
    batches = run.train_batches.batches(0)
    good, bad = next(batches), next(batches)
    rows = len(bad["weights"])
    bad["weights"][: rows // accum] = weight  # the first micro-batch only
    rng = jax.random.PRNGKey(0)

    state = run.state
    params, opt_state = _host(state.params), _host(state.opt_state)
    state, metrics = run.train_step(state, loop._global(bad, run.batch_sharding), rng)
    assert float(metrics["nonfinite"]) == 1.0 and not np.isfinite(float(metrics["grad_norm"]))
    assert np.isfinite(float(metrics["loss"])) == loss_finite
    assert int(state.step) == 1
    _assert_same(_host(state.params), params)
    _assert_same(_host(state.opt_state), opt_state)

    state, metrics = run.train_step(state, loop._global(good, run.batch_sharding), rng)
    assert float(metrics["nonfinite"]) == 0.0 and int(state.step) == 2
    assert any(not np.array_equal(v, params[k]) for k, v in _host(state.params).items())
    counts = [v for k, v in _host(state.opt_state).items() if k.endswith(".count")]
    assert counts and all(int(c) == 1 for c in counts)  # one update done, not two


def test_a_skipped_ist_step_leaves_its_own_optimizer_state_unchanged(
    tmp_path_factory, tiny_pair_files, tmp_path, monkeypatch
):
    """A step plugin's own gradient and optimizer (IST: per-layer masked Adam with per-layer
    counts) is skipped the same way. The causal LM loss ignores row weights, so its loss is
    wrapped: multiplied by 1 + 0 * sum(weights), which is 1 unless a weight is NaN."""
    loss_fn = objectives.CausalLM.loss_fn

    def poisonable(self, trainable, frozen, batch, rng, **kwargs):
        loss, aux = loss_fn(self, trainable, frozen, batch, rng, **kwargs)
        return loss * (1.0 + 0.0 * jnp.sum(batch["weights"])), aux

    monkeypatch.setattr(objectives.CausalLM, "loss_fn", poisonable)
    llama4 = write_tiny_decoder(tmp_path_factory.mktemp("llama4"), "llama", layers=4)
    overrides = [f"--config.model.path={llama4}", "--config.task=pairs"]
    overrides += [f"--config.data.data_files.{s}={p}" for s, p in tiny_pair_files.items()]
    overrides += ["--config.ist.mode=ist", "--config.ist.probe_batch_size=4"]
    overrides += ["--config.train.nonfinite=skip", "--config.train.compilation_cache=False"]
    config = load_config("configs/causal_lm.py:runlocal", overrides)
    run = loop.setup_run(config, tmp_path, log=_quiet)
    run.checkpointer.close()
    assert run.plugin is not None and run.plugin.make_optimizer is not None
    batch = next(run.train_batches.batches(0))
    rng = jax.random.PRNGKey(0)
    state = run.state
    before = _host((state.params, state.opt_state, state.extra))
    poisoned = {**batch, "weights": np.full_like(batch["weights"], np.nan)}
    state, metrics = run.train_step(state, loop._global(poisoned, run.batch_sharding), rng)
    assert float(metrics["nonfinite"]) == 1.0 and int(state.step) == 1
    _assert_same(_host((state.params, state.opt_state, state.extra)), before)
    state, metrics = run.train_step(state, loop._global(batch, run.batch_sharding), rng)
    assert float(metrics["nonfinite"]) == 0.0
    assert any(
        not np.array_equal(v, before[k]) for k, v in _host((state.params, state.opt_state)).items()
    )


def test_a_nan_step_stops_the_run_and_saves_nothing_of_it(
    tiny_bert_dir, tiny_task_files, tmp_path, monkeypatch
):
    """Default train.nonfinite=stop: step 3 is NaN -> an error naming step 3; the latest
    checkpoint is step 2 and the best one is not from step 3 (validation at every step here)."""
    _poisoning(monkeypatch, {2})
    config = _config(tiny_bert_dir, tiny_task_files, eval_every_steps=1)
    assert config.train.nonfinite == "stop"
    with pytest.raises(FloatingPointError, match=r"step 3: loss nan.*latest checkpoint is step 2"):
        train_and_evaluate(config, tmp_path)
    with Checkpointer(tmp_path / "checkpoints", best_metric="validation/accuracy") as ckpt:
        assert ckpt.latest_step() == 2
        _, best_meta = ckpt.restore_best(None)
    assert best_meta["step"] <= 2
    assert not (tmp_path / "results.json").exists()
    assert max(r["step"] for r in _records(tmp_path)) == 2  # nothing recorded of step 3


def test_a_stopped_run_resumed_with_skip_skips_the_step_and_counts_it(
    tiny_bert_dir, tiny_task_files, tmp_path, monkeypatch
):
    """train.nonfinite=skip (which a resume may change): the NaN step 3 is skipped, its update
    discarded (checkpoint 3 holds checkpoint 2's params and optimizer state), the run finishes,
    and the skipped step is counted in the metrics and results."""
    _poisoning(monkeypatch, {2})
    with pytest.raises(FloatingPointError, match="step 3"):
        train_and_evaluate(_config(tiny_bert_dir, tiny_task_files, max_checkpoints=10), tmp_path)

    monkeypatch.undo()
    _poisoning(monkeypatch, {0})  # the resumed run's first step is step 3 again
    config = _config(tiny_bert_dir, tiny_task_files, max_checkpoints=10, nonfinite="skip")
    results = train_and_evaluate(config, tmp_path)
    assert results["steps"] == STEPS and results["skipped_steps"] == 1
    (state2, meta2), (state3, meta3) = _saved(tmp_path, 2), _saved(tmp_path, 3)
    assert int(state3["step"]) == 3 and meta3["skipped_steps"] == 1 and meta2["skipped_steps"] == 0
    _assert_same(_host(state3["params"]), _host(state2["params"]))
    _assert_same(_host(state3["opt_state"]), _host(state2["opt_state"]))
    state4, _ = _saved(tmp_path, 4)
    assert any(
        not np.array_equal(v, _host(state3["params"])[k])
        for k, v in _host(state4["params"]).items()
    )
    resumed = [r for r in _records(tmp_path) if "train/loss" in r and r["step"] > 2]
    assert {r["step"]: r["train/skipped_steps"] for r in resumed} == {3: 1, 4: 1}


# ---------------------------------------------------------------------------------------------
# Unwritable workdir, full disk


def _no_setup(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the run was set up")

    monkeypatch.setattr(loop, "setup_run", refuse)


def test_a_workdir_that_is_a_file_is_refused_before_anything_is_built(
    tiny_bert_dir, tiny_task_files, tmp_path, monkeypatch
):
    _no_setup(monkeypatch)
    config = _config(tiny_bert_dir, tiny_task_files)
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(NotADirectoryError, match=f"workdir {not_a_dir} exists and is not a dir"):
        train_and_evaluate(config, not_a_dir)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"checkpoint directory .*run/checkpoints exists"):
        train_and_evaluate(config, tmp_path / "run")


def test_an_unwritable_workdir_is_refused_before_anything_is_built(
    tiny_bert_dir, tiny_task_files, tmp_path, monkeypatch
):
    """As root (where the tests usually run) permissions do not stop a write, so os.access and
    the probe write are made to fail; as another user, a real read-only directory too."""
    _no_setup(monkeypatch)
    config = _config(tiny_bert_dir, tiny_task_files)
    workdir = tmp_path / "run"
    workdir.mkdir()
    for denied, what in ((workdir, "workdir"), (workdir / "checkpoints", "directory")):
        denied.mkdir(exist_ok=True)
        with monkeypatch.context() as patch:
            patch.setattr(loop.os, "access", lambda path, mode, no=denied: Path(path) != no)
            with pytest.raises(PermissionError, match=f"{what} {denied} cannot be written"):
                train_and_evaluate(config, workdir)

    real_open = open

    def full(path, *args, **kwargs):
        if ".write_probe_" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr("builtins.open", full)
        with pytest.raises(OSError, match=f"workdir {workdir} cannot be written .No space") as info:
            train_and_evaluate(config, workdir)
    assert info.value.errno == errno.ENOSPC
    assert not [p for p in workdir.iterdir() if p.name.startswith(".write_probe")]

    if os.geteuid() != 0:
        workdir.chmod(0o500)
        try:
            with pytest.raises(PermissionError, match=str(workdir)):
                train_and_evaluate(config, workdir)
        finally:
            workdir.chmod(0o700)


def _disk_full_at_commit_of(monkeypatch, step: int):
    """orbax's commit of step directory `step` (every file written, the rename to come) fails as a
    full disk does."""
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def commit(self, *args, **kwargs):
        if self._final_path.name == str(step) and self._final_path.parent.name == "checkpoints":
            raise OSError(errno.ENOSPC, "No space left on device", str(self.get()))
        return await finalize(self, *args, **kwargs)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", commit)


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(
    tiny_bert_dir, tiny_task_files, tmp_path, monkeypatch, uninterrupted
):
    """The save of step 3 fails with ENOSPC: the error names step 3 and the directory, step 2
    stays the latest and restorable, and the run resumed from it ends as an uninterrupted one."""
    config = _config(tiny_bert_dir, tiny_task_files)
    checkpoints = tmp_path / "checkpoints"
    with monkeypatch.context() as patch:
        _disk_full_at_commit_of(patch, 3)
        with pytest.raises(OSError, match=f"checkpoint 3 in {checkpoints} failed") as info:
            train_and_evaluate(config, tmp_path)
    assert info.value.errno == errno.ENOSPC
    assert "latest complete checkpoint there is still 2" in str(info.value)
    with Checkpointer(checkpoints) as ckpt:
        assert ckpt.latest_step() == 2
        state, meta = ckpt.restore(None)
    assert int(state["step"]) == 2 and meta["epoch"] == 0 and meta["batch"] == 2

    train_and_evaluate(config, tmp_path)
    _assert_ends_as(tmp_path, uninterrupted)


# ---------------------------------------------------------------------------------------------
# A damaged latest checkpoint


def _largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(step_dir: Path):
    """Every array file of the step (orbax's OCDBT data files under state/) cut to half."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    for path in files:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


def _flip(step_dir: Path):
    """One bit flipped in the middle of the largest array file: orbax reads it without error."""
    path = _largest_file(step_dir / "state")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate_meta(step_dir: Path):
    path = step_dir / "meta" / "metadata"
    path.write_bytes(path.read_bytes()[:5])


@pytest.mark.parametrize("damage", [_truncate, _flip, _truncate_meta], ids=lambda f: f.__name__)
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(
    tiny_bert_dir, tiny_task_files, tmp_path, monkeypatch, caplog, uninterrupted, damage
):
    """Crashed after step 3 (checkpoints 2 and 3), checkpoint 3 damaged: the resume warns naming
    its directory, continues from step 2 and ends bitwise equal to the uninterrupted run."""
    config = _config(tiny_bert_dir, tiny_task_files)
    run_crashing_after(monkeypatch, 3, config, tmp_path)
    checkpoints = tmp_path / "checkpoints"
    with Checkpointer(checkpoints) as ckpt:
        assert ckpt.all_steps() == [2, 3]
    damage(checkpoints / "3")

    with caplog.at_level(logging.WARNING):
        train_and_evaluate(config, tmp_path)
    warned = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert warned and f"{checkpoints / '3'}" in warned[0] and "restored step 2" in warned[0]
    assert [p.name.split("-")[0] for p in (checkpoints / "corrupted").iterdir()] == ["3"]
    _assert_ends_as(tmp_path, uninterrupted)


# ---------------------------------------------------------------------------------------------
# Resuming with another config


def test_resuming_with_another_config_is_refused_naming_the_keys(
    tiny_bert_dir, tiny_task_files, tmp_path, monkeypatch
):
    """A changed optim.lr (and label smoothing) is refused with both values before config.json
    is written; a changed train.num_steps (to extend the run) resumes."""
    run_crashing_after(monkeypatch, 2, _config(tiny_bert_dir, tiny_task_files), tmp_path)
    saved = (tmp_path / "config.json").read_text()

    changed = _config(tiny_bert_dir, tiny_task_files, label_smoothing=0.1)
    changed.optim.lr = 3e-3
    with pytest.raises(ValueError, match="Differing keys") as info:
        train_and_evaluate(changed, tmp_path)
    message = str(info.value)
    assert "optim.lr: 0.0001 (saved) -> 0.003 (now)" in message
    assert "train.label_smoothing: 0.0 (saved) -> 0.1 (now)" in message
    assert str(tmp_path) in message and "num_steps" in message  # what may change
    assert (tmp_path / "config.json").read_text() == saved

    # A run directory from before a config field existed (config.json lacks it) resumes; one
    # from another config file (a field the new config lacks) does not.
    old = json.loads(saved)
    del old["data"]["hub_path"]
    old["train"]["extra_field"] = 1
    (tmp_path / "config.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"train\.extra_field: 1 \(saved\)") as info:
        train_and_evaluate(_config(tiny_bert_dir, tiny_task_files), tmp_path)
    assert "hub_path" not in str(info.value)
    del old["train"]["extra_field"]
    (tmp_path / "config.json").write_text(json.dumps(old))

    longer = _config(tiny_bert_dir, tiny_task_files, num_steps=STEPS + 1, progress_bar=True)
    results = train_and_evaluate(longer, tmp_path)
    assert results["steps"] == STEPS + 1
    assert json.loads((tmp_path / "config.json").read_text())["train"]["num_steps"] == STEPS + 1


def test_a_fresh_or_untrained_workdir_takes_any_config(tiny_bert_dir, tiny_task_files, tmp_path):
    """config.json without checkpoints (a run that died before its first save) is no run to
    protect: a new config is written over it."""
    (tmp_path / "config.json").write_text(json.dumps({"optim": {"lr": 1.0}}))
    config = _config(tiny_bert_dir, tiny_task_files, num_steps=1)
    train_and_evaluate(config, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["lr"] == config.optim.lr
