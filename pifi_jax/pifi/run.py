"""PiFi in the trainer: a run config's `pifi` section -> the model, the layer, and its provenance.

PiFi plugs into the trainer as the model builder "pifi" (`config.builder`, set by
configs/pifi.py; see pifi_jax.train.builders): the trainer looks it up by name and never asks
which method it trains. `build_for_run`, behind it, besides building the model

- resolves `pifi.layer`: an index, or "auto" = run the layer selection (pifi_jax.pifi.select) on
  the task's training data first, writing its table, CSV and plot to <workdir>/layer_selection/;
- records where the frozen layer came from in <workdir>/pifi_layer.json (LLM path, layer index,
  sha256 of its tensors, storage dtype). The layer is frozen, so checkpoints never hold it; a run
  directory whose checkpoints were trained against one layer refuses to resume (or be evaluated)
  against another. This check runs while the model is built, so it also catches what the
  trainer's general check of the config (pifi_jax.train.loop.check_resume_config, run after it)
  cannot see: pifi.layer=auto choosing again, or other weights at the same LLM path.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from pifi_jax import data, peft
from pifi_jax.pifi import select
from pifi_jax.pifi.names import short_name
from pifi_jax.pifi.plugin import TASKS, build, layer_fingerprint
from pifi_jax.train import checkpoint
from pifi_jax.train.builders import BuiltModel, peft_method, register_builder

PROVENANCE_FILE = "pifi_layer.json"
SELECTION_DIR = "layer_selection"
# Fields of the record that must match for a run directory's checkpoints to be reused.
_IDENTITY = ("method", "layer", "sha256")


def run_name(config) -> str:
    """<task>_<slm>_base or <task>_<slm>_pifi_<llm>_L<layer>: base and PiFi runs never share a
    default run directory (and so never resume each other's checkpoints)."""
    pc = config.pifi
    name = f"{config.task}_{short_name(str(config.model.path))}_{pc.method}"
    if pc.method == "pifi":
        name += f"_{short_name(str(pc.llm))}_L{pc.layer}"
    return name


def selection_config(config) -> select.SelectionConfig:
    pc = config.pifi
    return select.SelectionConfig(
        method=pc.selection,
        samples=pc.selection_samples,
        pcs=pc.selection_pcs,
        top_pcs=pc.selection_top_pc,
        holdout=pc.selection_holdout,
        max_length=pc.selection_max_length,
        batch_size=pc.selection_batch_size,
        dtype=jnp.dtype(pc.selection_dtype),
        seed=config.seed,
    )


def _train_examples(config, task) -> data.Examples:
    """The training split as the run reads it (same source, files, column map and split seed)."""
    cfg = config.data
    files = {split: path for split, path in cfg.data_files.items() if path}
    column_map = data.parse_column_map(cfg.column_map)
    return data.load_examples(
        task,
        "train",
        source=cfg.source,
        data_files=files or None,
        column_map=column_map or None,
        seed=cfg.split_seed,
    )


def _read_record(workdir: Path) -> dict | None:
    path = workdir / PROVENANCE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _has_checkpoints(workdir: Path) -> bool:
    # The trainer's own test of a run that has trained (which also refuses to resume it with a
    # different config, pifi_jax.train.loop.check_resume_config).
    return checkpoint.has_checkpoints(workdir / "checkpoints")


def _layer_index(config, task, workdir: Path, log) -> tuple[int, bool]:
    """(layer index, whether automatic selection chose it)."""
    pc = config.pifi
    if str(pc.layer) != "auto":
        try:
            return int(pc.layer), False
        except ValueError:
            raise ValueError(
                f"pifi.layer={pc.layer!r}: use a layer index (-1 = last) or 'auto'"
            ) from None
    record = _read_record(workdir)
    if record and record.get("auto") and record.get("llm") == pc.llm and _has_checkpoints(workdir):
        log(f"pifi.layer=auto: layer {record['layer']}, chosen when this run started")
        return record["layer"], True
    scores = select_for_config(config, task, workdir / SELECTION_DIR, log)
    return scores.chosen, True


def select_for_config(config, task, out_dir: Path | None = None, log=print) -> select.LayerScores:
    """Runs the layer selection of `config.pifi` on the task's training data; writes table.txt,
    scores.csv and scores.png to `out_dir` (process 0) when given."""
    pc = config.pifi
    if task.num_labels < 2:
        raise ValueError("layer selection needs a classification task (labels are classes)")
    examples = _train_examples(config, task)
    options = selection_config(config)
    log(f"layer selection: every layer of {pc.llm} on {options.samples} training examples")
    scores = select.select_layer(
        pc.llm, examples.texts, np.asarray(examples.labels), options, log=log
    )
    log(scores.table())
    if out_dir is not None and jax.process_index() == 0:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        scores.write_csv(out_dir / "scores.csv")
        title = f"{config.task}: {short_name(str(pc.llm))}, chosen layer {scores.chosen}"
        scores.plot(out_dir / "scores.png", title)
        (out_dir / "table.txt").write_text(scores.table() + "\n", encoding="utf-8")
    return scores


def check_provenance(workdir: Path, record: dict) -> None:
    """Refuses a run directory whose checkpoints were trained with another layer (or method);
    otherwise (re)writes the record."""
    previous = _read_record(workdir)
    if previous is not None and _has_checkpoints(workdir):
        if any(previous.get(k) != record.get(k) for k in _IDENTITY):

            def describe(r):
                if r.get("method") != "pifi":
                    return f"method {r.get('method')!r} (no LLM layer)"
                return f"layer {r['layer']} of {r['llm']} (sha256 {r['sha256'][:12]}...)"

            raise ValueError(
                f"{workdir} holds checkpoints trained with {describe(previous)}, but this config "
                f"plugs in {describe(record)}. The frozen layer is not saved in checkpoints, so "
                "resuming would pair them with a different layer. Use another --workdir, or set "
                "the config back to the original layer."
            )
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / PROVENANCE_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")


def build_for_run(
    config,
    slm_dir,
    task,
    workdir,
    *,
    mesh,
    logical_axis_rules,
    log=print,
    model_task: str = "classification",
):
    """(module, params) of the PiFi model (or its baseline) that `config` describes: a
    classifier, for model_task "question_answering" the span model, for "causal_lm" a decoder
    SLM's causal LM with the layer before its LM head, for "seq2seq" an encoder-decoder with the
    layer over its encoder states."""
    pc = config.pifi
    workdir = Path(workdir)
    method = peft.config.from_flat_config(config.peft)
    kw = dict(
        task=model_task,
        num_labels=getattr(task, "num_labels", 2),
        method=pc.method,
        pooling=pc.pooling,
        mode=pc.mode,
        residual=pc.get("residual", True),
        head_dropout=pc.head_dropout,
        dtype=jnp.dtype(config.model.dtype),
        layer_dtype=jnp.dtype(pc.layer_dtype),
        mesh=mesh,
        logical_axis_rules=logical_axis_rules,
        seed=config.seed,
        peft=method if method.method != "full" else None,
        log=log,
    )
    if pc.method == "base":
        module, params = build(slm_dir, None, **kw)
        record = {"method": "base"}
    else:
        if model_task != "classification" and str(pc.layer) == "auto":
            raise ValueError(
                "pifi.layer=auto: layer selection scores layers against class labels, which a "
                f"{model_task} task has none of; give a layer index (-1 = last), got task "
                f"{task.name!r}"
            )
        index, auto = _layer_index(config, task, workdir, log)
        module, params = build(slm_dir, pc.llm, index, **kw)
        layer = module.pifi.llm_layer
        record = {
            "method": "pifi",
            "llm": str(pc.llm),
            "layer": layer.layer_index,
            "num_layers": layer.config.num_layers,
            "auto": auto,
            "dtype": str(jnp.dtype(pc.layer_dtype)),
            "sha256": layer_fingerprint(params["pifi"]["llm_layer"]),
        }
        log(
            f"PiFi: layer {record['layer']} of {record['num_layers']} from {pc.llm} "
            f"({layer.config.model_type}, hidden {layer.config.hidden_size}, {record['dtype']}, "
            f"frozen), " + _placement(module)
        )
    check_provenance(workdir, record)
    return module, params


def _placement(module) -> str:
    """Where the layer sits, for the log."""
    if module.task == "causal_lm":
        form = "h + W_out(layer(W_in h))" if module.residual else "W_out(layer(W_in h))"
        return f"before the LM head (causal, {form})"
    if module.task == "seq2seq":
        form = "e + W_out(layer(W_in e))" if module.residual else "W_out(layer(W_in e))"
        return f"over the encoder states, the decoder's memory ({form})"
    if module.task == "question_answering":
        return "over every token"
    return f"{module.mode} mode, {module.pooling} pooling"


PLUGIN_WEIGHTS = "pifi_plugin.safetensors"


def save_adapter(module, params: dict, directory, format: str = "native") -> Path:
    """The trainable part of a PiFi run with a PEFT SLM: the SLM's adapter (pifi_jax.peft's
    save_adapter, in `format`) and W_in, W_out and the head in <directory>/pifi_plugin.safetensors
    ("/"-joined paths). The frozen layer is not written: pifi_layer.json says where it is."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    head = module.head_name
    slm = {k: v for k, v in params.items() if k not in ("pifi", head)}
    peft.save_adapter(module.encoder, slm, directory, format=format)
    plugin = {k: v for k, v in params.items() if k == head}
    if "pifi" in params:
        plugin["pifi"] = {k: v for k, v in params["pifi"].items() if k != "llm_layer"}
    flat = traverse_util.flatten_dict(jax.device_get(plugin), sep="/")
    save_file({p: np.asarray(v) for p, v in flat.items()}, str(directory / PLUGIN_WEIGHTS))
    return directory


class PifiBuilder:
    """The "pifi" model builder: the PiFi model (or its base) of the config's `pifi`
    section, for the objective's task; with a PEFT method on the SLM, its leaves, W_in, W_out and the head train, and the
    adapter is written with the plug-in weights beside it (`save_adapter`)."""

    def build(self, config, model_dir, model_task, task, workdir, *, mesh, logical_axis_rules, log):
        if model_task not in TASKS:
            raise ValueError(
                f"the PiFi builder makes classifiers, extractive QA models, causal LMs and "
                f"encoder-decoders {TASKS}; objective {model_task!r} is not supported by it"
            )
        module, params = build_for_run(
            config,
            model_dir,
            task,
            workdir,
            mesh=mesh,
            logical_axis_rules=logical_axis_rules,
            log=log,
            model_task=model_task,
        )
        built = BuiltModel(module, params, module.param_axes)
        method = peft_method(config)
        if method is not None:
            log(f"PEFT method on the SLM: {method}")
            built.trainable_rules = module.trainable_rules(params)
            built.peft_module = module.encoder
            built.save_adapter = lambda p, d, fmt: save_adapter(module, p, d, format=fmt)
        return built

    def run_name(self, config) -> str:
        return run_name(config)


register_builder("pifi", PifiBuilder())
