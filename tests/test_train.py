"""The trainer: freezing, gradient accumulation, label smoothing, regression, resuming after a kill.

Step-level checks build the state the way `pifi_jax.train.loop` does (split by rules, optimizer on
the trainable part only, `TrainState.create`) and call `make_train_step` directly; run-level checks
go through `train_and_evaluate` in-process, or `python -m launch.train` in a subprocess where the
process itself must die.
"""

from __future__ import annotations

import csv
import json
import math
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pifi_jax
from configs.classify import get_config
from pifi_jax import data
from pifi_jax.train import (
    Checkpointer,
    TrainState,
    make_optimizer,
    make_train_step,
    split_params,
    train_and_evaluate,
)
from pifi_jax.train.objectives import Classification
from pifi_jax.train.partition import flatten
from tests.conftest import FILLER, NEGATIVE, POSITIVE, REPO, subprocess_env, tiny_overrides

FREEZE_EMBEDDINGS_AND_LAYER_0 = (
    (r"bert/embeddings/.*", "frozen"),
    (r"bert/encoder/layer_0/.*", "frozen"),
    (r".*", "trainable"),
)


def _quiet(*_):
    pass


def _tiny_config(model_dir, files: dict, task: str = "sst2"):
    """configs/classify.py:runlocal pointed at a tiny model and local files (what tiny_overrides
    does on the command line)."""
    config = get_config("runlocal")
    config.model.path = str(model_dir)
    config.task = task
    config.data.source = "local"
    for split, path in files.items():
        config.data.data_files[split] = str(path)
    return config


def _train_batches(model_dir, files: dict, batch_size: int = 8, count: int = 3) -> list[dict]:
    """The first `count` training batches of the tiny task, as the loop would feed them."""
    task = data.get_task("sst2")
    examples = data.load_examples(task, "train", source="local", data_files=files)
    encoded = data.encode(data.load_tokenizer(str(model_dir)), examples, max_length=32)
    batcher = data.Batcher(encoded, batch_size, (32,), shuffle=True, seed=0, drop_remainder=True)
    batches = []
    for batch in batcher.batches(0):
        batches.append({k: jnp.asarray(v) for k, v in batch.items()})
        if len(batches) == count:
            break
    return batches


def _host_copy(tree) -> dict[str, np.ndarray]:
    return {path: np.array(leaf) for path, leaf in flatten(tree).items()}


def _param_paths_in(opt_state) -> dict[str, int]:
    """ "/"-joined parameter paths found in an optimizer state -> number of array elements.

    A parameter-shaped buffer (Adam's mu, nu, ...) sits under the parameter's dict keys; the
    optimizer's own scalars (step counts) sit under no dict key and are reported under "".
    """
    sizes: dict[str, int] = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        names = [k.key for k in key_path if isinstance(k, jax.tree_util.DictKey)]
        path = "/".join(names)
        sizes[path] = sizes.get(path, 0) + int(np.size(leaf))
    return sizes


@pytest.fixture(scope="module")
def no_dropout_bert(tiny_bert_dir, tmp_path_factory) -> Path:
    """The tiny checkpoint with every dropout probability 0, so that a train step is a
    deterministic function of params and batch (the model's dropout follows config.json)."""
    directory = tmp_path_factory.mktemp("tiny_bert_no_dropout")
    shutil.copytree(tiny_bert_dir, directory, dirs_exist_ok=True)
    config_file = directory / "config.json"
    hf_config = json.loads(config_file.read_text())
    hf_config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config_file.write_text(json.dumps(hf_config))
    return directory


def _gradient_recorder() -> optax.GradientTransformation:
    """An optimizer whose state is the last gradient it received and whose update is zero, so a
    train step exposes exactly the gradient it computed."""

    def init(params):
        return jax.tree.map(jnp.zeros_like, params)

    def update(grads, state, params=None):
        del state, params
        return jax.tree.map(jnp.zeros_like, grads), grads

    return optax.GradientTransformation(init, update)


# ---------------------------------------------------------------------------------------------
# Freezing


def test_frozen_leaves_are_unchanged_and_have_no_optimizer_state(tiny_bert_dir, tiny_task_files):
    module, params = pifi_jax.from_pretrained(tiny_bert_dir, num_labels=2, log=_quiet)
    trainable, frozen = split_params(params, FREEZE_EMBEDDINGS_AND_LAYER_0)
    trainable_paths, frozen_paths = set(flatten(trainable)), set(flatten(frozen))
    assert frozen_paths == {
        p for p in flatten(params) if p.startswith(("bert/embeddings/", "bert/encoder/layer_0/"))
    }
    assert "bert/encoder/layer_1/attention/self/query/kernel" in trainable_paths

    optimizer = make_optimizer(get_config("runlocal").optim, trainable, total_steps=3)
    state = TrainState.create(trainable, frozen, optimizer)

    # AdamW keeps two buffers (mu, nu) per trainable leaf and nothing at all for a frozen one.
    opt_sizes = _param_paths_in(state.opt_state)
    scalars = opt_sizes.pop("", 0)
    assert set(opt_sizes) == trainable_paths
    assert not set(opt_sizes) & frozen_paths
    trainable_size = sum(np.size(x) for x in jax.tree.leaves(trainable))
    assert sum(opt_sizes.values()) == 2 * trainable_size
    assert scalars < 10  # step counters only

    before_trainable, before_frozen = _host_copy(trainable), _host_copy(frozen)
    train_step = jax.jit(make_train_step(Classification(module, 2), optimizer))
    rng = jax.random.PRNGKey(0)
    for batch in _train_batches(tiny_bert_dir, tiny_task_files):
        state, step_metrics = train_step(state, batch, rng)
        assert math.isfinite(float(step_metrics["loss"]))
    assert int(state.step) == 3

    after_frozen = _host_copy(state.frozen)
    assert after_frozen.keys() == before_frozen.keys()
    for path, value in after_frozen.items():
        assert np.array_equal(value, before_frozen[path]), f"frozen leaf {path} changed"
    after_trainable = _host_copy(state.params)
    assert after_trainable.keys() == before_trainable.keys()
    unchanged = [p for p, v in after_trainable.items() if np.array_equal(v, before_trainable[p])]
    assert not unchanged, f"trainable leaves did not change: {unchanged}"
    assert set(_param_paths_in(state.opt_state)) - {""} == trainable_paths


def test_rules_leaving_a_leaf_unmatched_are_refused_naming_it(
    tiny_bert_dir, tiny_task_files, tmp_path
):
    config = _tiny_config(tiny_bert_dir, tiny_task_files)
    # No rule covers the pooler or the classifier head.
    config.train.trainable_rules = (
        (r"bert/embeddings/.*", "frozen"),
        (r"bert/encoder/.*", "trainable"),
    )
    with pytest.raises(ValueError, match=r"match no partition rule") as error:
        train_and_evaluate(config, tmp_path / "run")
    for leaf in ("classifier/kernel", "classifier/bias", "bert/pooler/dense/kernel"):
        assert leaf in str(error.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_attention_implementation_is_refused_naming_it(
    tiny_bert_dir, tiny_task_files, tmp_path
):
    config = _tiny_config(tiny_bert_dir, tiny_task_files)
    config.model.attention = "flash"
    with pytest.raises(ValueError, match=r"attention implementation 'flash'"):
        train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------
# Gradient accumulation and label smoothing


def test_gradient_accumulation_equals_one_big_batch(no_dropout_bert, tiny_task_files):
    module, params = pifi_jax.from_pretrained(no_dropout_bert, num_labels=2, log=_quiet)
    assert module.config.hidden_dropout_prob == module.config.attention_probs_dropout_prob == 0.0
    batch = _train_batches(no_dropout_bert, tiny_task_files, count=1)[0]
    # Three padding rows at the end: the micro-batches (rows 0-3 and 4-7) then weigh 4 and 1, so
    # averaging the two micro-batch means instead of re-weighting them would be caught.
    weights = np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32)
    rng = jax.random.PRNGKey(0)
    optimizer = _gradient_recorder()
    state = TrainState.create(params, {}, optimizer)

    steps = {
        accum: jax.jit(make_train_step(Classification(module, 2), optimizer, accum_steps=accum))
        for accum in (1, 2)
    }

    def run(accum_steps, step_weights):
        step_batch = {**batch, "weights": jnp.asarray(step_weights)}
        new_state, step_metrics = steps[accum_steps](state, step_batch, rng)
        return _host_copy(new_state.opt_state), jax.device_get(step_metrics)

    grads_1, metrics_1 = run(1, weights)
    grads_2, metrics_2 = run(2, weights)
    assert grads_1.keys() == grads_2.keys() == flatten(params).keys()

    # The two paths differ only in float32 summation order (two sums of 4 rows re-weighted by
    # their weight sums vs one sum of 8 rows): rounding at the 1e-7 relative level, a few ops
    # deep (the largest difference seen is 1.5e-7 of the largest gradient). The tolerances are
    # several times that and far below what a wrong accumulation gives (checked below).
    scale = max(float(np.abs(g).max()) for g in grads_1.values())
    assert scale > 0

    def assert_close(actual, expected):
        for path in expected:
            np.testing.assert_allclose(
                actual[path], expected[path], rtol=1e-5, atol=1e-6 * scale, err_msg=path
            )

    assert_close(grads_2, grads_1)
    for name in ("loss", "accuracy", "grad_norm"):
        np.testing.assert_allclose(metrics_2[name], metrics_1[name], rtol=1e-5, err_msg=name)

    # The same check can tell a wrong accumulation: the per-micro-batch gradients (the big-batch
    # step with the other rows' weights set to 0), averaged without their weights, differ from
    # the accumulated gradient by far more than the tolerance.
    first, _ = run(1, weights * (np.arange(8) < 4))
    second, _ = run(1, weights * (np.arange(8) >= 4))
    assert_close(grads_2, {p: (4 * first[p] + 1 * second[p]) / 5 for p in first})
    mean_of_means = {p: (first[p] + second[p]) / 2 for p in first}
    with pytest.raises(AssertionError):
        assert_close(grads_2, mean_of_means)


def test_label_smoothing_reaches_the_loss(no_dropout_bert, tiny_task_files):
    module, params = pifi_jax.from_pretrained(no_dropout_bert, num_labels=2, log=_quiet)
    # A fresh head gives logits near 0, where smoothing hardly moves the loss; a larger head
    # makes confident predictions, where it does.
    kernel = params["classifier"]["kernel"]
    params["classifier"]["kernel"] = 10 * jax.random.normal(jax.random.PRNGKey(1), kernel.shape)
    batch = _train_batches(no_dropout_bert, tiny_task_files, count=1)[0]
    eps = 0.2
    optimizer = _gradient_recorder()
    step = jax.jit(make_train_step(Classification(module, 2, label_smoothing=eps), optimizer))
    _, step_metrics = step(TrainState.create(params, {}, optimizer), batch, jax.random.PRNGKey(0))

    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    logits = np.asarray(module.apply({"params": params}, **inputs, deterministic=True), np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    onehot = np.eye(2)[np.asarray(batch["labels"])]

    def expected_loss(smoothing):
        targets = (1 - smoothing) * onehot + smoothing / 2
        return float(np.mean(-(targets * log_probs).sum(-1)))

    # The check can tell smoothing from none: the two losses are far apart at this eps.
    assert abs(expected_loss(eps) - expected_loss(0.0)) > 1e-2
    assert float(step_metrics["loss"]) == pytest.approx(expected_loss(eps), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Regression


def _write_stsb_files(directory: Path, sizes=(("train", 32), ("validation", 16), ("test", 16))):
    """stsb-shaped csv files: two sentences and a similarity score in [0, 5]."""
    rng = random.Random(0)
    vocabulary = FILLER + POSITIVE + NEGATIVE
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, n in sizes:
        path = directory / f"{split}.csv"
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["sentence1", "sentence2", "label"])
            for _ in range(n):
                a = rng.sample(vocabulary, rng.randint(2, 6))
                b = rng.sample(vocabulary, rng.randint(2, 6))
                score = 5.0 * len(set(a) & set(b)) / len(set(a) | set(b))
                writer.writerow([" ".join(a), " ".join(b), f"{score:.3f}"])
        files[split] = str(path)
    return files


@pytest.fixture(scope="module")
def stsb_files(tmp_path_factory) -> dict:
    return _write_stsb_files(tmp_path_factory.mktemp("stsb"))


def test_regression_trains_one_step_and_reports_correlations(tiny_bert_dir, stsb_files, tmp_path):
    task = data.get_task("stsb")
    assert task.text_columns == ("sentence1", "sentence2") and task.num_labels == 1
    config = _tiny_config(tiny_bert_dir, stsb_files, task="stsb")
    config.train.num_steps = 1
    config.train.batch_size = 8
    results = train_and_evaluate(config, tmp_path / "run")

    assert results["steps"] == 1
    for split in ("validation", "test"):
        for metric in ("pearson", "spearman"):
            value = results[f"{split}/{metric}"]
            assert -1.0 <= value <= 1.0, (split, metric, value)
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == results
    lines = [
        json.loads(line)
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().split("\n")
        if line
    ]
    train_loss = [line["train/loss"] for line in lines if "train/loss" in line]
    assert len(train_loss) == 1 and math.isfinite(train_loss[0]) and train_loss[0] > 0


def test_early_stopping_stops_after_patience_evaluations_without_improvement(
    tiny_bert_dir, tiny_task_files, tmp_path
):
    # lr 0: the validation accuracy never moves, so the first evaluation is the best and every
    # later one counts against the patience of 2: training stops at the third evaluation.
    config = _tiny_config(tiny_bert_dir, tiny_task_files)
    config.train.num_steps = 10
    config.train.eval_every_steps = 1
    config.train.early_stopping_patience = 2
    config.optim.lr = 0.0
    results = train_and_evaluate(config, tmp_path / "run")
    assert results["steps"] == 3
    evaluations = [
        json.loads(line)
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if "validation/accuracy" in line and "final/" not in line
    ]
    assert [e["step"] for e in evaluations] == [1, 2, 3]


# ---------------------------------------------------------------------------------------------
# Resuming after SIGKILL

RESUME_STEPS = 8
# Results that measure wall-clock time, not the training outcome.
TIMING_KEYS = ("train_seconds", "steps_per_second")


def _launch(workdir: Path, overrides: list[str], env: dict, log: Path) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "launch.train",
        "--config=configs/classify.py:runlocal",
        *overrides,
        f"--workdir={workdir}",
    ]
    with open(log, "a") as out:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def _finish(process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    returncode = process.wait(timeout=timeout)
    assert returncode == 0, f"run failed ({returncode}):\n{log.read_text()[-4000:]}"


def _completed_steps(checkpoints: Path) -> list[int]:
    # Orbax writes into "<step>.orbax-checkpoint-tmp-*" and renames when complete.
    if not checkpoints.is_dir():
        return []
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())


def _saved(workdir: Path):
    """(latest state, its meta, best state, its meta) as saved by the run, as host arrays."""
    ckpt = Checkpointer(workdir / "checkpoints", best_metric="validation/pearson")
    try:
        state, meta = ckpt.restore(None)
        best, best_meta = ckpt.restore_best(None)
    finally:
        ckpt.close()
    return state, meta, best, best_meta


def _flat_leaves(tree) -> dict[str, np.ndarray]:
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _metric_records(workdir: Path) -> dict[tuple[int, str], float]:
    """(step, name) -> value from metrics.jsonl; a resumed run rewrites some steps (same values)."""
    records = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        step = entry.pop("step")
        for name, value in entry.items():
            records[(step, name)] = value
    return records


@pytest.mark.slow  # 33 s; deterministic kills: test_checkpoint, test_faults, benchmarks/kill_resume.py
def test_run_killed_at_a_random_moment_resumes_to_the_same_result(
    tiny_bert_dir, stsb_files, tmp_path
):
    # Regression, because its validation metric moves at every evaluation (a classifier this
    # small predicts one class for the first steps), so the best checkpoint changes across the
    # kill too.
    overrides = [o for o in tiny_overrides(tiny_bert_dir, stsb_files) if "config.task=" not in o]
    overrides += [
        "--config.task=stsb",
        f"--config.train.num_steps={RESUME_STEPS}",
        "--config.train.checkpoint_every_steps=1",
        "--config.train.eval_every_steps=2",
        "--config.train.log_every_steps=1",
        "--config.optim.lr=3e-3",
        f"--config.train.trainable_rules={FREEZE_EMBEDDINGS_AND_LAYER_0!r}",
    ]
    env = subprocess_env(1)
    # The three processes compile the same programs; share them through JAX's persistent cache
    # (the first, uninterrupted run fills it) so that only the first run pays for compilation.
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

    reference, resumed = tmp_path / "uninterrupted", tmp_path / "killed"
    log = tmp_path / "runs.log"
    _finish(_launch(reference, overrides, env, log), log)

    # Kill after a randomly chosen completed checkpoint plus a random delay: anywhere in the
    # next step's training, evaluation or (half-written) checkpoint.
    seed = random.randrange(2**32)
    chooser = random.Random(seed)
    kill_after, delay = chooser.randint(1, RESUME_STEPS - 3), chooser.uniform(0.0, 0.3)
    moment = f"seed {seed}: SIGKILL {delay:.3f}s after checkpoint {kill_after} exists"
    print(moment)
    process = _launch(resumed, overrides, env, log)
    deadline = time.monotonic() + 120
    while not [s for s in _completed_steps(resumed / "checkpoints") if s >= kill_after]:
        assert process.poll() is None, f"run ended before the kill ({moment}):\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no checkpoint {kill_after} in time"
        time.sleep(0.01)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL, f"run finished before the kill ({moment})"
    assert _completed_steps(resumed / "checkpoints")

    _finish(_launch(resumed, overrides, env, log), log)  # the same command again: resumes
    assert "resumed from" in log.read_text()

    state_a, meta_a, best_a, best_meta_a = _saved(reference)
    state_b, meta_b, best_b, best_meta_b = _saved(resumed)
    assert meta_b == meta_a and best_meta_b == best_meta_a
    leaves_a, leaves_b = _flat_leaves(state_a), _flat_leaves(state_b)
    assert leaves_a.keys() == leaves_b.keys()
    for key in leaves_a:  # trainable params, optimizer state, step and rng: bitwise
        assert np.array_equal(leaves_a[key], leaves_b[key]), f"{key} differs ({moment})"
    assert int(state_b["step"]) == RESUME_STEPS
    for key, value in _flat_leaves(best_a).items():
        assert np.array_equal(value, _flat_leaves(best_b)[key]), f"best {key} differs ({moment})"
    # Frozen leaves are not checkpointed.
    saved_params = flatten(state_a["params"])
    assert saved_params and not [p for p in saved_params if "embeddings" in p or "layer_0" in p]

    def outcome(workdir):
        results = json.loads((workdir / "results.json").read_text())
        return {k: v for k, v in results.items() if k not in TIMING_KEYS}

    assert outcome(resumed) == outcome(reference)
    assert outcome(reference)["steps"] == RESUME_STEPS
    records = _metric_records(reference)
    assert _metric_records(resumed) == records
    assert len({v for (_, name), v in records.items() if name == "validation/pearson"}) > 1
