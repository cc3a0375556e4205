"""The training loop: config + workdir in, a fine-tuned model, metrics and checkpoints out.

    train_and_evaluate(config, workdir)

The run directory holds config.json (the resolved config), metrics.jsonl, TensorBoard event files
(tb/), checkpoints/ (latest few, for resuming) and checkpoints/best/ (the best on validation), and
results.json (validation and test metrics of the best checkpoint). Running the same command again on
the same workdir resumes from the latest checkpoint: parameters, optimizer state, step, data
position and early-stopping counters are restored, so the run ends exactly as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from pifi_jax import data, parallel, peft
from pifi_jax.hub import from_pretrained, resolve_checkpoint
from pifi_jax.layers import set_attention_implementation
from pifi_jax.models import registry
from pifi_jax.train import checkpoint, metrics, optim, partition
from pifi_jax.train.step import TrainState, make_eval_step, make_train_step

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _dtype(name: str):
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def load_splits(config, tokenizer, task) -> dict[str, data.Encoded]:
    """Encoded train/validation/test splits (those the task defines), capped by data.max_examples."""
    cfg = config.data
    out = {}
    files = {split: path for split, path in cfg.data_files.items() if path}
    local = cfg.source == "local" or (cfg.source == "auto" and bool(files))
    column_map = dict(item.split("=", 1) for item in cfg.column_map.split(",") if item)
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
            n = min(cfg.max_examples, len(examples))
            examples = data.Examples(
                tuple(t[:n] for t in examples.texts), examples.labels[:n], examples.origin
            )
        out[split] = data.encode(tokenizer, examples, cfg.max_length)
    if "train" not in out:
        raise ValueError(f"task {task.name!r} has no train split with data.source={cfg.source!r}")
    return out


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
    return TrainState(step=repl, params=trainable_sh, frozen=frozen_sh, opt_state=opt_sh)


def _global(batch: dict, sharding) -> dict:
    """This process's share of a batch -> global arrays sharded over the data axes."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def evaluate(eval_step, state, batcher: data.Batcher, sharding, metric_names) -> dict[str, float]:
    preds, labels, weights = [], [], []
    for batch in batcher.batches(0):
        global_batch = _global(batch, sharding)
        p, y, w = eval_step(state, global_batch)
        preds.append(np.asarray(p))
        labels.append(np.asarray(y))
        weights.append(np.asarray(w))
    return metrics.compute_metrics(
        metric_names, np.concatenate(preds), np.concatenate(labels), np.concatenate(weights)
    )


@dataclasses.dataclass
class Run:
    """The pieces of a run that training and evaluation share (see setup_run)."""

    task: data.TaskSpec
    method: Any
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


def default_workdir(config) -> str:
    """runs/<task>_<model name>: the same command always finds (and resumes) the same run."""
    if "pifi" in config:
        from pifi_jax.pifi.run import run_name

        return str(Path("runs") / run_name(config))
    model = Path(str(config.model.path).rstrip("/")).name.replace("asset:", "")
    return str(Path("runs") / f"{config.task}_{model}")


def setup_run(config: ml_collections.ConfigDict, workdir: Path, log=print) -> Run:
    """Everything a run needs before its first step: data, model, state, jitted steps, checkpoints."""

    # Read when the steps are traced (their first call), so set before anything is jitted.
    set_attention_implementation(config.model.get("attention", "native"))
    mesh = parallel.make_mesh(config.mesh.to_dict())
    rules = tuple(
        (name, tuple(axes) if isinstance(axes, list) else axes)
        for name, axes in config.logical_axis_rules
    )
    batch_sh = parallel.batch_sharding(mesh, rules)
    repl = parallel.replicated(mesh)

    task = data.get_task(config.task)
    model_dir = resolve_checkpoint(config.model.path)
    tokenizer = data.load_tokenizer(str(config.model.tokenizer or model_dir))
    splits = load_splits(config, tokenizer, task)
    tc = config.train
    batcher_kw = dict(process_index=jax.process_index(), process_count=jax.process_count())
    buckets = tuple(config.data.buckets)
    train_batches = data.Batcher(
        splits["train"],
        tc.batch_size,
        buckets,
        shuffle=True,
        seed=config.seed,
        drop_remainder=True,
        **batcher_kw,
    )
    eval_batches = {
        name: data.Batcher(
            enc,
            tc.eval_batch_size,
            buckets,
            shuffle=False,
            seed=0,
            drop_remainder=False,
            **batcher_kw,
        )
        for name, enc in splits.items()
        if name != "train"
    }
    steps_per_epoch = train_batches.num_batches()
    total_steps = tc.num_steps or tc.epochs * steps_per_epoch
    log(f"task {task.name}: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
    log(
        f"{steps_per_epoch} steps/epoch, {total_steps} steps, global batch {tc.batch_size}, mesh {dict(mesh.shape)}"
    )

    method = peft.config.from_flat_config(config.peft)
    if "pifi" in config:
        # PiFi (configs/pifi.py): SLM + frozen LLM layer + head; the layer's provenance is
        # recorded in (and checked against) the run directory.
        from pifi_jax.pifi.run import build_for_run

        module, params = build_for_run(
            config, model_dir, task, workdir, mesh=mesh, logical_axis_rules=rules, log=log
        )
        param_axes = module.param_axes
    else:
        module, params = from_pretrained(
            model_dir,
            task="classification",
            num_labels=task.num_labels,
            dtype=_dtype(config.model.dtype),
            mesh=mesh,
            logical_axis_rules=rules,
            seed=config.seed,
            peft=method if method.method != "full" else None,
            log=log,
        )
        param_axes = registry.family_for(module.config.model_type).PARAM_AXES
    param_sh = parallel.param_shardings(partition.flatten(params), param_axes, mesh, rules)
    if method.method == "full":
        trainable_rules = [tuple(r) for r in tc.trainable_rules]
    elif "pifi" in config:
        # PiFi with a PEFT SLM: the method's leaves, W_in, W_out and the head train.
        trainable_rules = module.trainable_rules(params)
        log(f"PEFT method on the SLM: {method}")
    else:
        trainable_rules = peft.trainable_rules(module, params)
        log(f"PEFT method: {method}")
    log(partition.partition_table(params, trainable_rules))
    trainable, frozen = partition.split_params(params, trainable_rules)
    if config.model.frozen_dtype:
        frozen = jax.tree.map(lambda x: x.astype(_dtype(config.model.frozen_dtype)), frozen)

    optimizer = optim.make_optimizer(config.optim, trainable, total_steps)
    schedule = optim.schedule_from_config(config.optim, total_steps)
    state = TrainState.create(trainable, frozen, optimizer)
    state_sh = _state_shardings(state, optimizer, param_sh, mesh)
    state = jax.device_put(state, state_sh)
    num_labels = task.num_labels

    train_step = jax.jit(
        make_train_step(
            module,
            optimizer,
            num_labels=num_labels,
            label_smoothing=tc.label_smoothing,
            accum_steps=tc.grad_accum_steps,
            schedule=schedule,
        ),
        in_shardings=(state_sh, batch_sh, repl),
        out_shardings=(state_sh, repl),
        donate_argnums=0,
    )
    predict = make_eval_step(module, num_labels)
    eval_step = jax.jit(
        lambda s, b: (predict(s, b), b["labels"], b["weights"]),
        in_shardings=(state_sh, batch_sh),
        out_shardings=repl,
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
        method=method,
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
    )


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
    for name, batcher in run.eval_batches.items():
        scores = evaluate(run.eval_step, state, batcher, run.batch_sharding, run.task.metrics)
        results.update({f"{name}/{k}": v for k, v in scores.items()})
    run.checkpointer.close()
    return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Fine-tunes config.model.path on config.task; returns the best checkpoint's metrics."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    lead = jax.process_index() == 0
    log = print if lead else (lambda *_: None)
    run = setup_run(config, workdir, log)  # refuses a run directory it must not resume first
    if lead:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    task, method, module, state = run.task, run.method, run.module, run.state
    batch_sh, repl, tc = run.batch_sharding, run.replicated, config.train
    train_batches, eval_batches = run.train_batches, run.eval_batches
    train_step, eval_step, ckpt, best_key = (
        run.train_step,
        run.eval_step,
        run.checkpointer,
        run.best_key,
    )
    steps_per_epoch, total_steps, num_labels = run.steps_per_epoch, run.total_steps, task.num_labels
    # Replicated over the mesh: orbax cannot save a process-local array in a multi-process run.
    base_rng = jax.device_put(jax.random.PRNGKey(config.seed), repl)
    position = {"epoch": 0, "batch": 0, "best": None, "bad_evals": 0}
    latest = ckpt.latest_step()
    if latest is not None:
        saved = {
            "step": state.step,
            "params": state.params,
            "opt_state": state.opt_state,
            "rng": base_rng,
        }
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            saved,
        )
        restored, meta = ckpt.restore(abstract)
        state = state.replace(
            step=restored["step"], params=restored["params"], opt_state=restored["opt_state"]
        )
        base_rng = restored["rng"]
        position = {k: meta[k] for k in position}
        log(
            f"resumed from {workdir / 'checkpoints'} at step {latest} (epoch {position['epoch']}, batch {position['batch']})"
        )

    def save(step: int):
        saved = {
            "step": state.step,
            "params": state.params,
            "opt_state": state.opt_state,
            "rng": base_rng,
        }
        ckpt.save(step, saved, dict(position))

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
    started, first_step = time.time(), step
    while step < total_steps and not stop:
        for batch in train_batches.batches(position["epoch"], start=position["batch"]):
            state, step_metrics = train_step(state, _global(batch, batch_sh), base_rng)
            step += 1
            position["batch"] += 1
            if position["batch"] == steps_per_epoch:
                position["epoch"], position["batch"] = position["epoch"] + 1, 0
            if step % tc.log_every_steps == 0 or step == total_steps:
                values = {f"train/{k}": float(v) for k, v in step_metrics.items()}
                writer.write(step, values)
                shown = {"loss": f"{values['train/loss']:.4f}"}
                if num_labels > 1:
                    shown["acc"] = f"{values['train/accuracy']:.3f}"
                bar.set_postfix(shown)
            bar.update(1)
            evaluated = False
            if "validation" in eval_batches and (step % eval_every == 0 or step == total_steps):
                evaluated = True
                scores = evaluate(
                    eval_step, state, eval_batches["validation"], batch_sh, task.metrics
                )
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
                save(step)
            if step >= total_steps or stop:
                break
    bar.close()
    elapsed = time.time() - started
    ckpt.wait()

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
    for name, batcher in eval_batches.items():
        for k, v in evaluate(eval_step, state, batcher, batch_sh, task.metrics).items():
            results[f"{name}/{k}"] = v
    writer.write(step, {f"final/{k}": v for k, v in results.items() if "/" in k})
    writer.close()
    ckpt.close()
    if lead:
        (workdir / "results.json").write_text(json.dumps(results, indent=2))
    if method.method != "full" and lead:
        # The best adapter alone, in Hugging Face PEFT's format where PEFT has one (PiFi: the
        # SLM's adapter, with W_in, W_out and the head beside it).
        peft_model = module.encoder if "pifi" in config else module
        refusal = peft.hf_refusal(peft_model)
        fmt = "native" if refusal else "peft"
        if refusal:
            log(f"adapter saved in pifi_jax's native format: {refusal}")
        full = partition.merge_params(state.params, state.frozen)
        if "pifi" in config:
            from pifi_jax.pifi.run import save_adapter

            save_adapter(module, full, workdir / "adapter", format=fmt)
        else:
            peft.save_adapter(module, full, workdir / "adapter", format=fmt)
        log(f"adapter ({fmt} format): {workdir / 'adapter'}")
    log(
        "best checkpoint: "
        + ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in results.items()
        )
    )
    log(f"run directory: {workdir.resolve()}")
    return results
