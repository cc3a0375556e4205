"""The training loop: config + workdir in, a fine-tuned model, metrics and checkpoints out.

    train_and_evaluate(config, workdir)

The run directory holds config.json (the resolved config), metrics.jsonl, TensorBoard event files
(tb/), checkpoints/ (latest few, for resuming) and checkpoints/best/ (the best on validation), and
results.json (validation and test metrics of the best checkpoint), labels.json (classification:
the problem type and the class names in id order) and predictions_<split>.jsonl
(what the best checkpoint predicts for each evaluation example: class ids, or generated texts
beside their references). Running the same command again on
the same workdir resumes from the latest checkpoint: parameters, optimizer state, step, data
position and early-stopping counters are restored, so the run ends exactly as an uninterrupted one.

Faults:

- Resuming with another config. A workdir with checkpoints is resumed only by the config it
  was trained with (its config.json), up to the keys of RESUMABLE_KEYS: how long the run goes
  (train.epochs, train.num_steps: extending a run stretches its learning-rate schedule from the
  resumed step on), how it reports and checkpoints, what a non-finite step does, and where and
  with which kernels it runs (mesh, distributed, logical axis rules, model.attention, the
  evaluation batch size), none of which changes what a training step computes. Any other
  difference is refused before config.json is written, naming each dotted key with its saved
  and new values; a key the saved config lacks (a field added to the configs after the run
  began) is not a difference, a key the new config lacks (another config file) is.
- A workdir (or its checkpoints/) that is not a directory or cannot be written is refused
  before anything is built, naming the path.
- A NaN or infinite loss or gradient norm (train.nonfinite): "stop" ends the run with an error
  naming the step, before that step's state is evaluated or saved, so the latest checkpoint
  (and the best) stay those of the last good step; "skip" discards the step's update on device
  (pifi_jax.train.step) and goes on, counting such steps (train/skipped_steps in metrics.jsonl,
  skipped_steps in results.json, checkpointed with the data position). Each step's flag is read
  on the host one step late (after the next step is dispatched), so checking it does not stall
  the device.
- A failed save (a full disk) and a damaged latest checkpoint: see pifi_jax.train.checkpoint.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from pifi_jax import data, parallel, peft
from pifi_jax.hub import resolve_checkpoint
from pifi_jax.hub.pretrained import open_checkpoint
from pifi_jax.layers import set_attention_implementation
from pifi_jax.train import checkpoint, compile_cache, objectives, optim, partition, plugins
from pifi_jax.train.builders import BuiltModel, dtype_of, get_builder
from pifi_jax.train.step import NONFINITE_MODES, TrainState, make_eval_step, make_train_step

# A step plugin's own batch stream is shuffled with config.seed + this (train.plugins).
# Objectives whose evaluation generates: their evaluation batches hold the inputs only.
GENERATIVE_LAYOUTS = ("causal_lm", "seq2seq")
PERIODIC_SEED_OFFSET = 7919
# fold_in tag of a plugin's periodic step's randomness.
PERIODIC_RNG_TAG = 0x9E71
# Config keys a resumed run may change (module docstring); "section.*" covers a whole section.
RESUMABLE_KEYS = (
    "train.epochs",
    "train.num_steps",
    "train.progress_bar",
    "train.log_every_steps",
    "train.checkpoint_every_steps",
    "train.max_checkpoints",
    "train.eval_batch_size",
    "train.compilation_cache",
    "train.nonfinite",
    "model.attention",
    "mesh.*",
    "distributed.*",
    "logical_axis_rules",
)
_ABSENT = "(absent)"


def _flat_config(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _resumable(key: str) -> bool:
    return any(
        key == allowed or (allowed.endswith(".*") and key.startswith(allowed[:-1]))
        for allowed in RESUMABLE_KEYS
    )


def check_resume_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """Refuses to resume the checkpoints in `workdir` with a config that differs from its
    config.json in a key outside RESUMABLE_KEYS; does nothing for a workdir without both."""
    saved_file = workdir / "config.json"
    if not saved_file.is_file() or not checkpoint.has_checkpoints(workdir / "checkpoints"):
        return
    saved = _flat_config(json.loads(saved_file.read_text(encoding="utf-8")))
    new = _flat_config(json.loads(config.to_json_best_effort()))
    changed = [
        key
        for key in sorted(saved.keys() | new.keys())
        # A key the saved config lacks is a field added to the configs since the run began.
        if key in saved and saved[key] != new.get(key, _ABSENT) and not _resumable(key)
    ]
    if changed:
        lines = [
            f"  {key}: {saved.get(key, _ABSENT)!r} (saved) -> {new.get(key, _ABSENT)!r} (now)"
            for key in changed
        ]
        raise ValueError(
            f"{workdir} holds checkpoints trained with another config ({saved_file}); resuming "
            "them with this one would change what the run means. Differing keys:\n"
            + "\n".join(lines)
            + "\nUse another --workdir, or set these keys back. A resume may change only: "
            + ", ".join(RESUMABLE_KEYS)
        )


def require_writable_dir(path: Path, what: str, create: bool = True) -> None:
    """Checks that files can be written in directory `path` (os.access, then a probe file
    written and removed), creating it first (`create`; else a missing `path` passes: its parent
    is checked by the caller); raises naming the path otherwise."""
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"the {what} {path} exists and is not a directory")
    if not create and not path.exists():
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "no write permission")
        probe = path / f".write_probe_{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as error:
        reason = error.strerror or str(error)
        raise type(error)(
            error.errno, f"the {what} {path} cannot be written ({reason}); nothing was trained"
        ) from error


def _remove_new_workdir(workdir: Path) -> None:
    """Removes a run directory that this start created and then refused (what is in it, such as
    an empty checkpoints/ or a PiFi layer record, was written by this start): a refused new run
    leaves no run directory behind to be mistaken for one to resume."""
    shutil.rmtree(workdir, ignore_errors=True)


def load_splits(config, tokenizer, task, layout: str = "classification") -> dict[str, data.Encoded]:
    """Encoded train/validation/test splits (those the task defines), capped by data.max_examples,
    in the objective's `layout` (pifi_jax.data.tokenize)."""
    cfg = config.data
    for key in ("buckets", "target_buckets"):
        lengths = tuple(cfg.get(key, ()))
        if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in lengths):
            raise ValueError(
                f"data.{key} must be positive token lengths, e.g. (32, 64), got {lengths}"
            )
    if not tuple(cfg.buckets):
        raise ValueError("data.buckets is empty: give at least one length, e.g. (128,)")
    out = {}
    files = {split: path for split, path in cfg.data_files.items() if path}
    data.sources.check_data_files(files)
    local = cfg.source == "local" or (cfg.source == "auto" and bool(files))
    column_map = data.parse_column_map(cfg.column_map)
    for split in ("train", "validation", "test"):
        if split not in (files if local else task.splits):
            continue
        examples = data.load_examples(
            task,
            split,
            source=cfg.source,
            data_files=files or None,
            column_map=column_map or None,
            seed=cfg.split_seed,
        )
        if cfg.max_examples:
            examples = examples.head(min(cfg.max_examples, len(examples)))
        if layout == "classification":
            out[split] = data.encode(tokenizer, examples, cfg.max_length)
        elif layout == "span":
            out[split] = data.encode_spans(
                tokenizer, examples, cfg.max_length, cfg.doc_stride, train=split == "train"
            )
        else:
            out[split] = data.encode_generation(
                tokenizer,
                examples,
                layout=layout,
                prompt=generation_prompt(config, task, layout),
                max_length=cfg.max_length,
                max_target_length=cfg.max_target_length,
                target_column=column_map.get(task.target_column, task.target_column),
            )
        _check_buckets(out[split], examples, cfg)
    if "train" not in out:
        raise ValueError(f"task {task.name!r} has no train split with data.source={cfg.source!r}")
    return out


def _check_buckets(encoded: data.Encoded, examples: data.Examples, cfg) -> None:
    """Refuses an example longer than the largest of data.buckets, naming its file and row
    (texts are cut to data.max_length, so this means max_length exceeds every bucket)."""
    largest = max(cfg.buckets)
    lengths = np.array([len(ids) for ids in encoded.input_ids])
    if len(lengths) and lengths.max() > largest:
        position = int(np.argmax(lengths))
        if encoded.window_example is not None:  # span layout: rows are windows of examples
            position = int(encoded.window_example[position])
        row = position if examples.rows is None else int(examples.rows[position])
        if encoded.layout in ("classification", "span"):
            advice = (
                f"data.max_length={cfg.max_length} cuts texts to at most that: set "
                f"data.max_length <= {largest} or add a bucket of {cfg.max_length}"
            )
        else:
            advice = "add a larger bucket, or lower data.max_length or data.max_target_length"
        raise ValueError(
            f"{examples.origin}: row {row} is {lengths[position]} tokens long, more than the "
            f"largest of data.buckets {tuple(cfg.buckets)}; {advice}"
        )


def generation_prompt(config, task, layout: str) -> str:
    """How a source becomes the model's input: data.prompt, else the task's prompt for the
    layout (a decoder-only model's cue to answer, or an encoder-decoder's task prefix)."""
    return config.data.get("prompt", "") or (
        task.causal_prompt if layout == "causal_lm" else task.prompt
    )


def _record_step(line: str) -> float:
    """The step of a metrics.jsonl line; a line torn by a kill counts as after any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError):
        return float("inf")


class _Writer:
    """metrics.jsonl + TensorBoard events (tensorboardX: no TensorFlow needed); process 0 only."""

    def __init__(self, workdir: Path, enabled: bool, resume_step: int):
        self.enabled = enabled
        if enabled:
            from tensorboardX import SummaryWriter

            path = workdir / "metrics.jsonl"
            if path.exists():
                # A resumed run repeats the steps after its checkpoint: drop their old records.
                lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
                kept = [line for line in lines if _record_step(line) <= resume_step]
                path.write_text("".join(kept), encoding="utf-8")
            self.jsonl = open(path, "a", encoding="utf-8")
            self.tb = SummaryWriter(str(workdir / "tb"))

    def write(self, step: int, values: dict[str, float]):
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        for key, value in values.items():
            self.tb.add_scalar(key, value, step)
        self.tb.flush()

    def close(self):
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def _state_shardings(state: TrainState, optimizer, param_sh: dict, mesh) -> TrainState:
    """Shardings of the whole state: params by path; optimizer copies of params alike; rest replicated."""
    repl = parallel.replicated(mesh)
    trainable_sh = partition.unflatten({p: param_sh[p] for p in partition.flatten(state.params)})
    frozen_sh = partition.unflatten({p: param_sh[p] for p in partition.flatten(state.frozen)})
    opt_sh = optax.tree_map_params(
        optimizer,
        lambda _, s: s,
        state.opt_state,
        trainable_sh,
        transform_non_params=lambda _: repl,
    )
    extra_sh = jax.tree.map(lambda _: repl, state.extra)  # a plugin's state: small, replicated
    return TrainState(
        step=repl, params=trainable_sh, frozen=frozen_sh, opt_state=opt_sh, extra=extra_sh
    )


def _global(batch: dict, sharding) -> dict:
    """This process's share of a batch -> global arrays sharded over the data axes."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def evaluate(run: Run, state, split: str, progress: bool = False) -> dict[str, float]:
    """The objective's metrics of `state` on one evaluation split (all of it, in order)."""
    return run.objective.score(
        predict_split(run, state, split, progress), run.eval_batches[split].encoded
    )


def predict_split(run: Run, state, split: str, progress: bool = False) -> dict[str, np.ndarray]:
    """The objective's outputs (predict) over one whole evaluation split, rows in order."""
    batcher = run.eval_batches[split]
    batches = batcher.batches(0)
    if progress:
        batches = tqdm(batches, total=batcher.num_batches(), desc=split, leave=False)
    return collect_outputs(batches, lambda batch: run.eval_step(state, batch), run.batch_sharding)


def collect_outputs(batches, step, sharding) -> dict[str, np.ndarray]:
    """`step(global batch) -> {name: array}` over every batch of `batches` (this process's
    shares, made global over `sharding`), each output concatenated in batch order."""
    outputs: dict[str, list] = {}
    for batch in batches:
        for key, value in step(_global(batch, sharding)).items():
            outputs.setdefault(key, []).append(np.asarray(value))
    return {key: np.concatenate(values) for key, values in outputs.items()}


def eval_batcher(config, encoded: data.Encoded, batch_size: int, generate: bool) -> data.Batcher:
    """The batches evaluation and prediction read: every row once, in order, the last batch
    padded (weight 0); generative objectives get inputs only (`generate`)."""
    return data.Batcher(
        encoded,
        batch_size,
        tuple(config.data.buckets),
        shuffle=False,
        seed=0,
        drop_remainder=False,
        generate=generate,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        target_buckets=tuple(config.data.get("target_buckets", ())),
    )


@dataclasses.dataclass
class Run:
    """The pieces of a run that training and evaluation share (see setup_run)."""

    task: Any  # data.TaskSpec | data.GenerationTask
    objective: Any  # train.objectives
    built: BuiltModel
    module: Any
    state: TrainState
    batch_sharding: Any
    replicated: Any
    train_batches: data.Batcher
    eval_batches: dict
    train_step: Any
    eval_step: Any
    checkpointer: checkpoint.Checkpointer
    best_key: str
    steps_per_epoch: int
    total_steps: int
    trainable_params: int
    total_params: int
    progress: bool = False
    plugin: plugins.StepPlugin | None = None
    periodic_step: Any = None  # the plugin's jitted periodic step
    periodic_batches: data.Batcher | None = None  # and its batch stream


def default_workdir(config) -> str:
    """runs/<name>, the name given by the config's model builder (pretrained: <task>_<model>):
    the same command always finds (and resumes) the same run. A task read from your own files
    (task "local") adds a digest of the training file's absolute path, so that another data set
    never resumes this one's checkpoints."""
    name = get_builder(config.get("builder", "pretrained")).run_name(config)
    train_file = config.data.data_files.get("train", "")
    if getattr(data.get_task(config.task), "labels_from_data", False) and train_file:
        digest = hashlib.sha1(str(Path(train_file).resolve()).encode("utf-8")).hexdigest()[:8]
        name = f"{name}_{digest}"
    return str(Path("runs") / name)


@dataclasses.dataclass
class ModelSetup:
    """What training and prediction share before any data is read: the mesh, the task, the
    tokenizer and the objective's class (`model_context`), then the built model, its objective
    and its parameters split into trainable and frozen (`build_model`)."""

    mesh: Any
    rules: tuple
    batch_sharding: Any
    replicated: Any
    task: Any
    model_dir: Any
    objective_cls: type
    tokenizer: Any
    hf_config: dict
    built: BuiltModel | None = None
    objective: Any = None
    trainable: dict | None = None
    frozen: dict | None = None
    param_shardings: dict | None = None


def model_context(config: ml_collections.ConfigDict, task=None) -> ModelSetup:
    """The mesh, task (`task`, or the config's), checkpoint, tokenizer and objective class."""
    # Read when the steps are traced (their first call), so set before anything is jitted.
    set_attention_implementation(config.model.get("attention", "native"))
    mesh = parallel.make_mesh(config.mesh.to_dict())
    rules = tuple(
        (name, tuple(axes) if isinstance(axes, list) else axes)
        for name, axes in config.logical_axis_rules
    )
    if task is None:
        task = data.task_for_config(config)  # a registry entry, or read from the files (local)
    model_dir = resolve_checkpoint(config.model.path)
    _, hf_config = open_checkpoint(model_dir)
    return ModelSetup(
        mesh=mesh,
        rules=rules,
        batch_sharding=parallel.batch_sharding(mesh, rules),
        replicated=parallel.replicated(mesh),
        task=task,
        model_dir=model_dir,
        objective_cls=objectives.objective_class(config.get("objective", "auto"), task, hf_config),
        tokenizer=data.load_tokenizer(str(config.model.tokenizer or model_dir)),
        hf_config=hf_config,
    )


def build_model(config, setup: ModelSetup, workdir: Path, log=print) -> ModelSetup:
    """`setup` with the model built by the config's builder, its objective, and its parameters
    split by what trains (frozen ones cast to model.frozen_dtype)."""
    builder = get_builder(config.get("builder", "pretrained"))
    built = builder.build(
        config,
        setup.model_dir,
        setup.objective_cls.model_task,
        setup.task,
        workdir,
        mesh=setup.mesh,
        logical_axis_rules=setup.rules,
        log=log,
    )
    objective = objectives.make_objective(
        config, setup.task, built.module, setup.tokenizer, setup.hf_config
    )
    log(f"objective: {objective.name}")
    param_sh = parallel.param_shardings(
        partition.flatten(built.params), built.param_axes, setup.mesh, setup.rules
    )
    trainable_rules = built.trainable_rules
    if trainable_rules is None:
        trainable_rules = [tuple(r) for r in config.train.trainable_rules]
    log(partition.partition_table(built.params, trainable_rules))
    trainable, frozen = partition.split_params(built.params, trainable_rules)
    if config.model.frozen_dtype:
        frozen = jax.tree.map(lambda x: x.astype(dtype_of(config.model.frozen_dtype)), frozen)
    return dataclasses.replace(
        setup,
        built=built,
        objective=objective,
        trainable=trainable,
        frozen=frozen,
        param_shardings=param_sh,
    )


def use_compilation_cache(config, workdir: Path) -> Path | None:
    """Turns on the persistent compilation cache beside the run directory (train.compilation_cache,
    pifi_jax.train.compile_cache); returns the cache directory in use."""
    if not config.train.get("compilation_cache", False):
        return None
    return compile_cache.enable(compile_cache.cache_dir_for(workdir))


def setup_run(config: ml_collections.ConfigDict, workdir: Path, log=print) -> Run:
    """Everything a run needs before its first step: data, model, state, jitted steps, checkpoints."""
    use_compilation_cache(config, workdir)
    setup = model_context(config)
    mesh, task, tokenizer = setup.mesh, setup.task, setup.tokenizer
    batch_sh, repl, objective_cls = setup.batch_sharding, setup.replicated, setup.objective_cls
    splits = load_splits(config, tokenizer, task, objective_cls.layout)
    tc = config.train
    batcher_kw = dict(
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        target_buckets=tuple(config.data.get("target_buckets", ())),
    )
    buckets = tuple(config.data.buckets)
    train_batches = data.Batcher(
        splits["train"],
        tc.batch_size,
        buckets,
        shuffle=True,
        seed=config.seed,
        drop_remainder=True,
        pack=bool(config.data.get("pack", False)),
        **batcher_kw,
    )
    if train_batches.pack:
        tokens, rows = int(train_batches.lengths.sum()), len(train_batches.lengths)
        log(
            f"packing: {len(splits['train'])} training examples in {rows} rows of "
            f"{max(buckets)} slots ({tokens / (rows * max(buckets)):.1%} filled)"
        )
    # Generative objectives evaluate by generating: their evaluation batches hold inputs only.
    generates = objective_cls.layout in GENERATIVE_LAYOUTS
    eval_batches = {
        name: eval_batcher(config, enc, tc.eval_batch_size, generates)
        for name, enc in splits.items()
        if name != "train"
    }
    steps_per_epoch = train_batches.num_batches()
    total_steps = tc.num_steps or tc.epochs * steps_per_epoch
    log(f"task {task.name}: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
    log(
        f"{steps_per_epoch} steps/epoch, {total_steps} steps, global batch {tc.batch_size}, mesh {dict(mesh.shape)}"
    )

    setup = build_model(config, setup, workdir, log)
    built, objective = setup.built, setup.objective
    module, params = built.module, built.params
    trainable, frozen, param_sh = setup.trainable, setup.frozen, setup.param_shardings

    if total_steps > 0 and not jax.tree.leaves(trainable):
        rules = [tuple(r) for r in config.train.trainable_rules]
        raise ValueError(
            f"nothing trains: train.trainable_rules {rules} leave every one of the model's "
            f"{len(partition.flatten(params))} parameters frozen (the first rule whose regex "
            "fully matches a path decides); mark some trainable, or set train.epochs=0 to only "
            "evaluate the model as loaded"
            if built.trainable_rules is None
            else f"nothing trains: the builder {config.get('builder', 'pretrained')!r} "
            f"(peft.method={config.peft.method!r}) leaves every parameter frozen"
        )
    plugin = plugins.make_plugin(config, objective, trainable, log)
    # A run of 0 steps (train.epochs=0) only evaluates the model as loaded: the zero-shot floor.
    make_optimizer = optim.make_optimizer
    if plugin is not None and plugin.make_optimizer is not None:
        make_optimizer = plugin.make_optimizer
    optimizer = make_optimizer(config.optim, trainable, max(total_steps, 1))
    schedule = optim.schedule_from_config(config.optim, max(total_steps, 1))
    state = TrainState.create(
        trainable, frozen, optimizer, None if plugin is None else plugin.extra
    )
    state_sh = _state_shardings(state, optimizer, param_sh, mesh)
    state = jax.device_put(state, state_sh)

    train_step = jax.jit(
        make_train_step(
            objective,
            optimizer,
            accum_steps=tc.grad_accum_steps,
            schedule=schedule,
            plugin=plugin,
            nonfinite=tc.get("nonfinite", "stop"),
        ),
        in_shardings=(state_sh, batch_sh, repl),
        out_shardings=(state_sh, repl),
        donate_argnums=0,
    )
    periodic_step = periodic_batches = None
    if plugin is not None and plugin.periodic is not None:
        periodic_step = jax.jit(
            plugin.periodic,
            in_shardings=(state_sh, batch_sh, repl),
            out_shardings=(state_sh.extra, repl),
        )
        periodic_batches = data.Batcher(
            splits["train"],
            plugin.periodic_batch_size,
            buckets,
            shuffle=True,
            seed=config.seed + PERIODIC_SEED_OFFSET,  # a stream apart from the training batches
            drop_remainder=True,
            pack=bool(config.data.get("pack", False)),
            **batcher_kw,
        )
    eval_step = jax.jit(
        make_eval_step(objective), in_shardings=(state_sh, batch_sh), out_shardings=repl
    )

    best_key = f"validation/{tc.best_metric or task.primary_metric}"
    ckpt = checkpoint.Checkpointer(
        workdir / "checkpoints",
        max_to_keep=tc.max_checkpoints,
        best_metric=best_key,
        best_mode=tc.best_mode,
    )
    return Run(
        task=task,
        objective=objective,
        built=built,
        module=module,
        state=state,
        batch_sharding=batch_sh,
        replicated=repl,
        train_batches=train_batches,
        eval_batches=eval_batches,
        train_step=train_step,
        eval_step=eval_step,
        checkpointer=ckpt,
        best_key=best_key,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        trainable_params=sum(x.size for x in jax.tree.leaves(trainable)),
        total_params=sum(x.size for x in jax.tree.leaves(params)),
        progress=bool(tc.progress_bar) and jax.process_index() == 0,
        plugin=plugin,
        periodic_step=periodic_step,
        periodic_batches=periodic_batches,
    )


def task_labels(task) -> dict:
    """What labels.json holds: the problem type and the class names in id order (None for
    regression), e.g. for `save_pretrained(..., label_names=...)`."""
    names = task.label_names
    if names is None and not task.is_regression:
        names = tuple(f"LABEL_{i}" for i in range(task.num_labels))
    return {
        "problem_type": task.problem_type,
        "label_names": None if names is None else list(names),
    }


def _best_params(run: Run):
    """The best checkpoint's trainable parameters, or None if no evaluation has been saved."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), run.state.params
    )
    try:
        restored, _ = run.checkpointer.restore_best({"params": abstract})
    except FileNotFoundError:
        return None
    return restored["params"]


def evaluate_run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Metrics of the best checkpoint in `workdir` on every evaluation split of the config."""
    run = setup_run(config, Path(workdir), log=lambda *_: None)
    params = _best_params(run)
    if params is None:
        raise FileNotFoundError(f"no best checkpoint under {Path(workdir) / 'checkpoints'}")
    state = run.state.replace(params=params)
    results: dict[str, float] = {}
    for name in run.eval_batches:
        scores = evaluate(run, state, name)
        results.update({f"{name}/{k}": v for k, v in scores.items()})
    run.checkpointer.close()
    return results


DONE_EARLIER = "done earlier"  # what a runner logs when it skips finished work


def train_unless_finished(config, workdir: str | Path, name: str, log=print) -> dict:
    """The results of the run in `workdir`: read from its results.json when it finished earlier,
    else trained now (resuming its checkpoints): how runners of many runs resume."""
    done = Path(workdir) / "results.json"
    if done.is_file():
        log(f"{name}: {DONE_EARLIER} ({done})")
        return json.loads(done.read_text(encoding="utf-8"))
    log(f"{name}: training in {workdir}")
    return train_and_evaluate(config, workdir)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Fine-tunes config.model.path on config.task; returns the best checkpoint's metrics."""
    workdir = Path(workdir)
    nonfinite = config.train.get("nonfinite", "stop")
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"train.nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
    created = not workdir.exists()
    require_writable_dir(workdir, "workdir")
    require_writable_dir(workdir / "checkpoints", "checkpoint directory", create=False)
    lead = jax.process_index() == 0
    log = print if lead else (lambda *_: None)
    try:
        run = setup_run(config, workdir, log)  # refuses a run directory it must not resume first
        check_resume_config(config, workdir)
    except BaseException:
        if created and lead:
            _remove_new_workdir(workdir)
        raise
    if lead:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
        if run.task.kind == "classification":
            (workdir / "labels.json").write_text(json.dumps(task_labels(run.task), indent=2))
    state = run.state
    batch_sh, repl, tc = run.batch_sharding, run.replicated, config.train
    train_batches, eval_batches = run.train_batches, run.eval_batches
    train_step, ckpt, best_key = run.train_step, run.checkpointer, run.best_key
    steps_per_epoch, total_steps = run.steps_per_epoch, run.total_steps
    # Replicated over the mesh: orbax cannot save a process-local array in a multi-process run.
    base_rng = jax.device_put(jax.random.PRNGKey(config.seed), repl)
    position = {"epoch": 0, "batch": 0, "best": None, "bad_evals": 0, "skipped_steps": 0}
    periodic = run.periodic_batches
    if periodic is not None:  # where the plugin's own stream is
        position.update(periodic_epoch=0, periodic_batch=0)

    def saved_tree():
        saved = {
            "step": state.step,
            "params": state.params,
            "opt_state": state.opt_state,
            "rng": base_rng,
        }
        if state.extra is not None:
            saved["extra"] = state.extra
        return saved

    latest = ckpt.latest_step()
    if latest is not None:
        saved = saved_tree()
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            saved,
        )
        restored, meta = ckpt.restore(abstract)  # the latest readable one
        latest = int(restored["step"])
        state = state.replace(
            step=restored["step"],
            params=restored["params"],
            opt_state=restored["opt_state"],
            extra=restored.get("extra"),
        )
        base_rng = restored["rng"]
        position = {k: meta.get(k, v) for k, v in position.items()}
        log(
            f"resumed from {workdir / 'checkpoints'} at step {latest} (epoch {position['epoch']}, batch {position['batch']})"
        )

    def save(step: int):
        ckpt.save(step, saved_tree(), dict(position))

    def periodic_batch() -> dict:
        """The next batch of the plugin's stream, wrapping around its epochs."""
        if position["periodic_batch"] == periodic.num_batches():
            position["periodic_epoch"], position["periodic_batch"] = (
                position["periodic_epoch"] + 1,
                0,
            )
        batch = next(periodic.batches(position["periodic_epoch"], start=position["periodic_batch"]))
        position["periodic_batch"] += 1
        return batch

    writer = _Writer(workdir, lead, int(state.step))
    step = int(state.step)
    stop = False
    eval_every = tc.eval_every_steps or steps_per_epoch
    bar = tqdm(
        total=total_steps,
        initial=step,
        desc="train",
        disable=not lead or not tc.progress_bar,
        dynamic_ncols=True,
    )
    pending: list = []  # (step, its metrics) whose non-finite flag is still to be read

    def settle():
        """Reads the flags of the pending steps: stops at a non-finite one (train.nonfinite
        stop) or counts it (skip)."""
        for done, values in pending:
            if not float(values["nonfinite"]):
                continue
            where = (
                f"step {done}: loss {float(values['loss'])}, grad norm {float(values['grad_norm'])}"
            )
            if nonfinite == "skip":
                position["skipped_steps"] += 1
                bar.write(f"{where}: not finite, update skipped (train.nonfinite=skip)")
                continue
            kept = ckpt.latest_step()
            bar.close()
            ckpt.close()
            writer.close()
            raise FloatingPointError(
                f"{where}: not finite; training stopped (train.nonfinite=stop). Nothing of "
                f"step {done} was saved: the latest checkpoint is "
                + (f"step {kept}" if kept is not None else "none")
                + f" in {ckpt.directory}. Resume with --config.train.nonfinite=skip to skip such "
                "steps, or lower the learning rate in a new run."
            )
        pending.clear()

    started, first_step = time.time(), step
    while step < total_steps and not stop:
        for batch in train_batches.batches(position["epoch"], start=position["batch"]):
            plugin = run.plugin
            if periodic is not None and step > 0 and step % plugin.interval == 0:
                settle()  # no periodic step on the state of a step that stops the run
                rng = jax.random.fold_in(base_rng, PERIODIC_RNG_TAG)
                extra, periodic_metrics = run.periodic_step(
                    state, _global(periodic_batch(), batch_sh), jax.random.fold_in(rng, step)
                )
                state = state.replace(extra=extra)
                # Recorded under the step it serves (step + 1), so a run resumed from the
                # checkpoint of `step` drops and redoes it like that step's own record.
                writer.write(step + 1, {k: float(v) for k, v in periodic_metrics.items()})
            state, step_metrics = train_step(state, _global(batch, batch_sh), base_rng)
            settle()  # the previous step's flag, read while this step runs
            step += 1
            pending.append((step, step_metrics))
            position["batch"] += 1
            if position["batch"] == steps_per_epoch:
                position["epoch"], position["batch"] = position["epoch"] + 1, 0
            if step % tc.log_every_steps == 0 or step == total_steps:
                settle()
                values = {f"train/{k}": float(v) for k, v in step_metrics.items()}
                del values["train/nonfinite"]
                if nonfinite == "skip":
                    values["train/skipped_steps"] = position["skipped_steps"]
                writer.write(step, values)
                shown = {"loss": f"{values['train/loss']:.4f}"}
                if "train/accuracy" in values:
                    shown["acc"] = f"{values['train/accuracy']:.3f}"
                bar.set_postfix(shown)
            bar.update(1)
            evaluated = False
            if "validation" in eval_batches and (step % eval_every == 0 or step == total_steps):
                settle()
                evaluated = True
                scores = evaluate(run, state, "validation", run.progress)
                scores = {f"validation/{k}": v for k, v in scores.items()}
                writer.write(step, scores)
                value = scores[best_key]
                better = position["best"] is None or (
                    value > position["best"] if tc.best_mode == "max" else value < position["best"]
                )
                if better:
                    position["best"], position["bad_evals"] = value, 0
                    ckpt.save_best(step, {"params": state.params}, scores)
                else:
                    position["bad_evals"] += 1
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
                stop = (
                    bool(tc.early_stopping_patience)
                    and position["bad_evals"] >= tc.early_stopping_patience
                )
                if stop:
                    bar.write(
                        f"early stopping: no improvement of {best_key} in {position['bad_evals']} evaluations"
                    )
            if evaluated or step % tc.checkpoint_every_steps == 0 or step == total_steps or stop:
                settle()
                save(step)
            if step >= total_steps or stop:
                break
    settle()
    bar.close()
    elapsed = time.time() - started
    ckpt.wait()
    if run.plugin is not None and run.plugin.finish is not None and lead:
        run.plugin.finish(workdir)

    if position["best"] is not None:
        state = state.replace(params=_best_params(run))
    results = {
        "steps": step,
        "train_seconds": round(elapsed, 1),
        "trainable_params": run.trainable_params,
        "total_params": run.total_params,
    }
    if step > first_step:
        results["steps_per_second"] = round((step - first_step) / elapsed, 3)
    if nonfinite == "skip":
        results["skipped_steps"] = position["skipped_steps"]
    for name, batcher in eval_batches.items():
        outputs = predict_split(run, state, name, run.progress)
        for k, v in run.objective.score(outputs, batcher.encoded).items():
            results[f"{name}/{k}"] = v
        if lead:  # what the best checkpoint predicts, example by example
            records = run.objective.records(outputs, batcher.encoded)
            with open(workdir / f"predictions_{name}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    writer.write(step, {f"final/{k}": v for k, v in results.items() if "/" in k})
    writer.close()
    ckpt.close()
    if lead:
        (workdir / "results.json").write_text(json.dumps(results, indent=2))
    built = run.built
    if built.save_adapter is not None and lead:
        # The best adapter alone, in Hugging Face PEFT's format where PEFT has one.
        refusal = peft.hf_refusal(built.peft_module)
        fmt = "native" if refusal else "peft"
        if refusal:
            log(f"adapter saved in pifi_jax's native format: {refusal}")
        built.save_adapter(
            partition.merge_params(state.params, state.frozen), workdir / "adapter", fmt
        )
        log(f"adapter ({fmt} format): {workdir / 'adapter'}")
    log(
        "best checkpoint: "
        + ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in results.items()
        )
    )
    log(f"run directory: {workdir.resolve()}")
    return results
