"""Predictions of a trained run on new inputs (what `python -m launch.predict` runs).

    predictor = Predictor.from_workdir("runs/rt_minilm")
    rows = predictor.predict((["a gripping film", "dull and overlong"],))  # a list per text column
    predictor.predict_file("reviews.csv", "predictions.jsonl")

The run directory holds all it takes, and nothing of the training data is read:
- config.json rebuilds the model as training built it (its builder: the PEFT method, the PiFi
  layer, which pifi_layer.json pins);
- labels.json names the classes; for a task read from your own files (task "local") it is also
  where the classes come from, so the training file need not exist any more;
- the parameters are the best checkpoint's, or the latest checkpoint's when the run had no
  validation split (and so no best). The checkpoints are opened read-only: predicting from a run
  that is still training leaves its checkpoints alone.

What a row gets (`Predictor.predict`), after the input's text columns:
  single_label  {"label": name, "probabilities": {name: p, ...}}
  multi_label   {"labels": [every name with p > 0.5], "probabilities": {name: p, ...}}
  regression    {"score": value}
  generation    {"generated": text} (the config's generation section: greedy or beam)
  extractive QA {"answer": the best span of the context over its windows}

Inputs (`read_inputs`): a .csv/.tsv/.jsonl/.json/.parquet file holding the task's text columns
under the training data's names (the run's data.column_map applies; the task's own column names
work too; any other column, a label included, is ignored), or lines of text (stdin): one text per
line, a text pair as two tab-separated fields; blank lines are skipped. Outputs (`write_records`):
.jsonl, or .csv / .tsv with one column per class probability ("p:<name>") and multi-label names
joined by ",".
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from pifi_jax import data
from pifi_jax.data import sources
from pifi_jax.train import checkpoint, loop
from pifi_jax.train.partition import flatten, merge_params, unflatten

# Inputs of more batches than this get a progress bar (on stderr).
PROGRESS_MIN_BATCHES = 4


def load_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The resolved config a run saved in its directory."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {workdir} is not a run directory (train first, e.g. "
            "python -m launch.train --config=... --workdir=...)"
        )
    return ml_collections.ConfigDict(json.loads(path.read_text(encoding="utf-8")))


def run_task(config, workdir: str | Path):
    """The task a run trained: from the registry, or (task "local") rebuilt from labels.json."""
    template = data.get_task(config.task)
    if not getattr(template, "labels_from_data", False):
        return data.task_for_config(config)
    path = Path(workdir) / "labels.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: a run of task {config.task!r} keeps its classes there"
        )
    labels = json.loads(path.read_text(encoding="utf-8"))
    text_columns = tuple(c.strip() for c in str(config.data.text_columns).split(",") if c.strip())
    return data.local.task_from_labels(
        template,
        problem_type=labels["problem_type"],
        label_names=labels["label_names"],
        text_columns=text_columns,
        label_column=config.data.label_column,
    )


@dataclasses.dataclass
class Predictor:
    """A trained run ready to predict (build it with `from_workdir`)."""

    config: Any
    setup: loop.ModelSetup
    params: dict  # the trainable parameters of the checkpoint used
    checkpoint: str  # which one: "best (step N)" or "latest (step N)"
    label_names: list[str] | None
    _step: Any = None

    @property
    def task(self):
        return self.setup.task

    @classmethod
    def from_workdir(cls, workdir: str | Path, log=lambda *_: None) -> Predictor:
        workdir = Path(workdir)
        config = load_config(workdir)
        steps_dir = workdir / "checkpoints"
        ckpt_kw = dict(max_to_keep=max(int(config.train.max_checkpoints), 1), read_only=True)
        if not steps_dir.is_dir():
            raise FileNotFoundError(f"{steps_dir} not found: the run saved no checkpoint yet")
        task = run_task(config, workdir)
        loop.use_compilation_cache(config, workdir)
        quiet = lambda *_: None  # noqa: E731 (the partition table is training's to show)
        setup = loop.build_model(config, loop.model_context(config, task), workdir, quiet)
        param_sh = setup.param_shardings
        abstract = unflatten(
            {
                path: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=param_sh[path])
                for path, x in flatten(setup.trainable).items()
            }
        )
        ckpt = checkpoint.Checkpointer(steps_dir, best_metric="", **ckpt_kw)
        try:
            try:
                restored, meta = ckpt.restore_best({"params": abstract})
                params, which = restored["params"], f"best (step {meta['step']})"
            except FileNotFoundError:
                if ckpt.latest_step() is None:
                    raise FileNotFoundError(f"no checkpoint under {steps_dir}") from None
                params, step = ckpt.restore_subtree("params", abstract)
                which = f"latest (step {step}; the run kept no best checkpoint)"
        finally:
            ckpt.close()
        log(f"{workdir}: {which} checkpoint")
        names = None
        if task.kind == "classification":
            names = loop.task_labels(task)["label_names"]
        return cls(config, setup, params, which, names)

    def _predict_fn(self):
        if self._step is None:
            setup = self.setup
            shardings = setup.param_shardings
            trainable_sh = unflatten({p: shardings[p] for p in flatten(setup.trainable)})
            frozen_sh = unflatten({p: shardings[p] for p in flatten(setup.frozen)})
            objective = setup.objective
            self._step = jax.jit(
                lambda params, frozen, batch: objective.predict(
                    merge_params(params, frozen), batch
                ),
                in_shardings=(trainable_sh, frozen_sh, setup.batch_sharding),
                out_shardings=setup.replicated,
            )
        return self._step

    def encode(self, texts: Sequence[Sequence[str]], origin: str = "inputs") -> data.Encoded:
        """Tokenized inputs in the objective's layout (the labels are placeholders)."""
        task, config = self.task, self.config
        texts = tuple(list(column) for column in texts)
        if len(texts) != len(task.text_columns):
            raise ValueError(
                f"the run's task {task.name!r} reads {len(task.text_columns)} text column(s) "
                f"{list(task.text_columns)}, got {len(texts)}"
            )
        n = len(texts[0])
        layout = self.setup.objective_cls.layout
        if layout == "span":  # no answers: windows only, nothing to locate
            examples = sources.Examples(texts=texts, labels=None, origin=origin, rows=np.arange(n))
            return data.encode_spans(
                self.setup.tokenizer,
                examples,
                config.data.max_length,
                config.data.doc_stride,
                train=False,
            )
        if layout == "classification":
            if task.problem_type == "multi_label":
                labels = np.zeros((n, task.num_labels), np.float32)
            else:
                labels = np.zeros((n,), np.float32 if task.is_regression else np.int32)
            examples = sources.Examples(texts=texts, labels=labels, origin=origin)
            return data.encode(self.setup.tokenizer, examples, config.data.max_length)
        examples = sources.Examples(
            texts=texts, labels=None, origin=origin, targets=[""] * n, rows=np.arange(n)
        )
        return data.encode_generation(
            self.setup.tokenizer,
            examples,
            layout=layout,
            prompt=loop.generation_prompt(config, task, layout),
            max_length=config.data.max_length,
            max_target_length=max(int(config.data.get("max_target_length", 2)), 2),
        )

    def outputs(
        self, texts: Sequence[Sequence[str]], batch_size: int = 0, progress: bool = True
    ) -> dict[str, np.ndarray]:
        """The objective's raw outputs (`predict`) for every input row (extractive QA: every
        window of the rows), in order."""
        return self._outputs(self.encode(texts), batch_size, progress)

    def _outputs(self, encoded: data.Encoded, batch_size: int, progress: bool) -> dict:
        batcher = loop.eval_batcher(
            self.config,
            encoded,
            batch_size or self.config.train.eval_batch_size,
            generate=self.setup.objective_cls.layout in loop.GENERATIVE_LAYOUTS,
        )
        batches = batcher.batches(0)
        total = batcher.num_batches()
        show = progress and total >= PROGRESS_MIN_BATCHES and jax.process_index() == 0
        batches = tqdm(batches, total=total, desc="predict", disable=not show, file=sys.stderr)
        step = self._predict_fn()
        out = loop.collect_outputs(
            batches,
            lambda batch: step(self.params, self.setup.frozen, batch),
            self.setup.batch_sharding,
        )
        keep = out["weights"] != 0  # padding rows of the last batch
        return {key: value[keep] for key, value in out.items()}

    def predict(
        self, texts: Sequence[Sequence[str]], batch_size: int = 0, progress: bool = True
    ) -> list[dict]:
        """One record per input row (the module docstring), the texts first."""
        task = self.task
        encoded = self.encode(texts)
        outputs = self._outputs(encoded, batch_size, progress)
        rows = [
            dict(zip(task.text_columns, values, strict=True)) for values in zip(*texts, strict=True)
        ]
        if task.kind == "extractive_qa":
            for row, answer in zip(
                rows, self.setup.objective.answers(outputs, encoded), strict=True
            ):
                row["answer"] = answer
            return rows
        if task.kind == "generation":
            for row, text in zip(rows, self.setup.objective.decode(outputs["tokens"]), strict=True):
                row["generated"] = text
            return rows
        if task.is_regression:
            for row, score in zip(rows, outputs["predictions"], strict=True):
                row["score"] = float(score)
            return rows
        names = self.label_names
        for row, p, predicted in zip(
            rows, outputs["probabilities"], outputs["predictions"], strict=True
        ):
            probabilities = {name: round(float(v), 6) for name, v in zip(names, p, strict=True)}
            if task.problem_type == "multi_label":
                row["labels"] = [name for name, on in zip(names, predicted, strict=True) if on]
            else:
                row["label"] = names[int(predicted)]
            row["probabilities"] = probabilities
        return rows

    def predict_file(
        self,
        input_path: str | Path | None,
        output_path: str | Path | None = None,
        batch_size: int = 0,
        progress: bool = True,
    ) -> list[dict]:
        """Predicts every row of a file (or of stdin when `input_path` is None or "-") and
        writes the records to `output_path` (stdout as JSON lines when None)."""
        column_map = data.parse_column_map(self.config.data.column_map)
        texts = read_inputs(input_path, self.task.text_columns, column_map)
        records = self.predict(texts, batch_size, progress)
        write_records(records, output_path)
        return records


def read_inputs(
    path: str | Path | None, text_columns: Sequence[str], column_map: dict | None = None
) -> tuple[list[str], ...]:
    """The input texts, one list per text column (the module docstring says what is read)."""
    if path is None or str(path) == "-":
        return _read_lines(sys.stdin, len(text_columns))
    origin = str(path)
    if not Path(origin).is_file():
        raise FileNotFoundError(f"input file {origin} not found")
    if Path(origin).suffix.lower() == ".txt":
        with open(origin, encoding="utf-8") as f:
            return _read_lines(f, len(text_columns), origin)
    frame = sources._read_table(origin).reset_index(drop=True)
    if frame.empty:
        raise ValueError(f"{origin}: the file has no rows")
    present = list(frame.columns)
    texts = []
    for column in text_columns:
        mapped = (column_map or {}).get(column, column)
        name = mapped if mapped in present else column
        if name not in present:
            renamed = f" (task column {column!r})" if mapped != column else ""
            raise ValueError(
                f"{origin}: missing text column {mapped!r}{renamed}; columns present: {present}"
            )
        texts.append(sources._texts(frame, name, origin))
    return tuple(texts)


def _read_lines(stream, columns: int, origin: str = "stdin") -> tuple[list[str], ...]:
    texts: list[list[str]] = [[] for _ in range(columns)]
    for number, line in enumerate(stream, start=1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        fields = line.split("\t") if columns > 1 else [line]
        if len(fields) != columns:
            raise ValueError(
                f"{origin} line {number}: {len(fields)} tab-separated field(s); the run's task "
                f"reads a text pair (two fields)"
            )
        for column, field in zip(texts, fields, strict=True):
            if not field.strip():
                raise ValueError(f"{origin} line {number}: empty text")
            column.append(field)
    if not texts[0]:
        raise ValueError(f"{origin}: no input text")
    return tuple(texts)


def write_records(records: list[dict], path: str | Path | None) -> None:
    """Writes prediction records as JSON lines (stdout when `path` is None or "-"), or as
    .csv / .tsv (probabilities flattened to "p:<name>" columns)."""
    if path is None or str(path) == "-":
        sys.stdout.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        import pandas as pd  # noqa: PLC0415

        flat = []
        for record in records:
            row = {k: v for k, v in record.items() if k != "probabilities"}
            if "labels" in row:
                row["labels"] = ",".join(row["labels"])
            for name, p in record.get("probabilities", {}).items():
                row[f"p:{name}"] = p
            flat.append(row)
        pd.DataFrame(flat).to_csv(path, sep="\t" if suffix == ".tsv" else ",", index=False)
        return
    if suffix != ".jsonl":
        raise ValueError(f"{path}: unknown output type; use .jsonl, .csv or .tsv")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
