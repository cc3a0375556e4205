"""The GLUE suite: its nine tasks, their hidden test splits, the submission archive and the table.

    for entry in glue.SUITE.values():                        # cola, sst2, ..., wnli
        task = get_task(entry.task)                          # our registry's task ("glue_sst2")
        for file_name, texts, idx in glue.load_hidden(entry.name, hub_path):
            labels = glue.submission_labels(entry.name, predict(texts))
            files[file_name] = (idx, labels)
    glue.write_submission(files, "runs/glue/submission.zip")  # for gluebenchmark.com
    print(glue.format_table(rows))                           # rows: {suite name: {key: value}}

Choices:
- The tasks are the registry's GLUE tasks; SST-2 is "glue_sst2" (nyu-mll/glue's sst2, whose test
  split is the server's), not "sst2" (SetFit/sst2). Our class ids are the hub's label ids (the
  registry has no label map for GLUE), so a model's predicted id is the hub id.
- The table reports what the runs measure on labelled data: for every task but MNLI, our "test"
  split, which is GLUE's validation (dev) split (the registry's CoLA rule), i.e. the keys
  "test/<metric>" of a run's results.json. MNLI's registry test split is validation_mismatched;
  its matched figure needs `load_labelled("mnli", "validation_matched")`, so MNLI's keys are
  "matched/accuracy" and "mismatched/accuracy" (the runner fills them). `SuiteTask.metrics` lists
  the exact keys of each task; other keys in `rows` are ignored, so a results.json can be passed
  as it is.
- Values in `rows` are fractions, as compute_metrics returns them (0.853); the table and
  `glue_score` give percentages (85.3). A value outside [-1, 1] is refused as a likely
  percentage.
- The GLUE score is the mean over the nine tasks of each task's mean of its metrics (MRPC: F1 and
  accuracy; STS-B: Pearson and Spearman; MNLI: matched and mismatched accuracy averaged into one
  task score, as on the leaderboard). AX (the diagnostic set) is predicted by the MNLI model and
  submitted, but it is not part of the score.
- Submission: a zip archive with the 11 files the server expects at its top level (CoLA.tsv,
  SST-2.tsv, MRPC.tsv, STS-B.tsv, QQP.tsv, MNLI-m.tsv, MNLI-mm.tsv, QNLI.tsv, RTE.tsv, WNLI.tsv,
  AX.tsv), each with the header "index\tprediction" and one row per test example in order of
  the hub's `idx` (never the row order). Predictions: "entailment" / "neutral" /
  "contradiction" (MNLI, AX), "entailment" / "not_entailment" (QNLI, RTE), "0" / "1" (CoLA,
  SST-2, MRPC, QQP, WNLI, where WNLI's 1, like the hub's, is entailment), and STS-B's score
  clipped to [0, 5] with 3 decimals.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import types
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pifi_jax.data import sources
from pifi_jax.data.local import with_hub_path
from pifi_jax.data.tasks import TaskSpec, get_task

HUB_NAME = "nyu-mll/glue"
HEADER = ("index", "prediction")

_BINARY = ("0", "1")
_NLI = ("entailment", "neutral", "contradiction")
_TWO_WAY_NLI = ("entailment", "not_entailment")


@dataclasses.dataclass(frozen=True)
class SuiteTask:
    """One GLUE task of the suite.

    name: the suite's name (cola, sst2, ...); title: as GLUE writes it (CoLA, SST-2, ...).
    task: our registry task; config: its nyu-mll/glue config.
    metrics: the keys of `rows[name]` the table shows, in its order (e.g. "test/f1",
      "test/accuracy"); headings: their names in the table (e.g. "F1", "Acc.").
    submissions: (hub config, hidden test split, submission file name) of each file the task's
      model predicts (MNLI: matched, mismatched and AX).
    answers: the string the server expects for each class id; None: a score (STS-B).
    """

    name: str
    title: str
    task: str
    config: str
    metrics: tuple[str, ...]
    headings: tuple[str, ...]
    submissions: tuple[tuple[str, str, str], ...]
    answers: tuple[str, ...] | None

    @property
    def metric_label(self) -> str:
        """The table's metric column, e.g. "F1/Acc." or "Acc. m/mm"."""
        if self.name == "mnli":
            return "Acc. " + "/".join(self.headings)
        return "/".join(self.headings)


def _single(name, title, task, metric, heading, file_name, answers) -> SuiteTask:
    return SuiteTask(
        name=name,
        title=title,
        task=task,
        config=name,
        metrics=tuple(f"test/{m}" for m in metric),
        headings=heading,
        submissions=((name, "test", file_name),),
        answers=answers,
    )


# The nine tasks in the GLUE paper's order.
SUITE: Mapping[str, SuiteTask] = types.MappingProxyType(
    {
        entry.name: entry
        for entry in (
            _single("cola", "CoLA", "cola", ("mcc",), ("MCC",), "CoLA.tsv", _BINARY),
            _single("sst2", "SST-2", "glue_sst2", ("accuracy",), ("Acc.",), "SST-2.tsv", _BINARY),
            _single(
                "mrpc", "MRPC", "mrpc", ("f1", "accuracy"), ("F1", "Acc."), "MRPC.tsv", _BINARY
            ),
            _single(
                "stsb",
                "STS-B",
                "stsb",
                ("pearson", "spearman"),
                ("Pearson", "Spearman"),
                "STS-B.tsv",
                None,
            ),
            _single("qqp", "QQP", "qqp", ("f1", "accuracy"), ("F1", "Acc."), "QQP.tsv", _BINARY),
            SuiteTask(
                name="mnli",
                title="MNLI",
                task="mnli",
                config="mnli",
                metrics=("matched/accuracy", "mismatched/accuracy"),
                headings=("m", "mm"),
                submissions=(
                    ("mnli", "test_matched", "MNLI-m.tsv"),
                    ("mnli", "test_mismatched", "MNLI-mm.tsv"),
                    ("ax", "test", "AX.tsv"),
                ),
                answers=_NLI,
            ),
            _single("qnli", "QNLI", "qnli", ("accuracy",), ("Acc.",), "QNLI.tsv", _TWO_WAY_NLI),
            _single("rte", "RTE", "rte", ("accuracy",), ("Acc.",), "RTE.tsv", _TWO_WAY_NLI),
            _single("wnli", "WNLI", "wnli", ("accuracy",), ("Acc.",), "WNLI.tsv", _BINARY),
        )
    }
)

# The 11 files of a complete submission, in the server's order; file name -> its suite task.
SUBMISSION_FILES: tuple[str, ...] = (
    "CoLA.tsv",
    "SST-2.tsv",
    "MRPC.tsv",
    "STS-B.tsv",
    "QQP.tsv",
    "MNLI-m.tsv",
    "MNLI-mm.tsv",
    "QNLI.tsv",
    "RTE.tsv",
    "WNLI.tsv",
    "AX.tsv",
)
_FILE_TASK = {file: entry for entry in SUITE.values() for _, _, file in entry.submissions}
assert set(_FILE_TASK) == set(SUBMISSION_FILES)


def _entry(name: str) -> SuiteTask:
    """A suite task by its suite name ("ax" is MNLI's, whose model predicts it)."""
    name = "mnli" if name == "ax" else name
    if name not in SUITE:
        raise KeyError(f"{name!r} is not a GLUE suite task; the suite is {', '.join(SUITE)}")
    return SUITE[name]


def _repo(task: TaskSpec, hub_path: str) -> str:
    """The dataset repository to read: hub_path (checked as data.hub_path is) or the task's."""
    return with_hub_path(task, hub_path).hub_name if hub_path else task.hub_name


def _read_split(repo: str, config: str, split: str) -> tuple[pd.DataFrame, str]:
    """One split of a GLUE config as a frame, with errors that name the config and split."""
    import datasets  # heavy; only GLUE users pay for it
    from datasets.exceptions import DatasetsError

    origin = f"hub:{repo}:{config}[{split}]"
    try:
        dataset = datasets.load_dataset(repo, config, split=split)
    except (ValueError, FileNotFoundError, ConnectionError, DatasetsError) as error:
        raise ValueError(
            f"cannot read config {config!r} split {split!r} of {repo} ({origin}): {error}"
        ) from error
    frame = dataset.to_pandas().reset_index(drop=True)
    if frame.empty:
        raise ValueError(f"config {config!r} split {split!r} of {repo} has no rows ({origin})")
    return frame, origin


def _idx(frame: pd.DataFrame, origin: str) -> np.ndarray:
    if "idx" not in frame.columns:
        raise ValueError(f"{origin}: no 'idx' column; columns present: {list(frame.columns)}")
    values = frame["idx"]
    if not pd.api.types.is_integer_dtype(values):
        raise ValueError(f"{origin}: column 'idx' holds {values.dtype}, not integers")
    idx = values.to_numpy(np.int64)
    _, first, counts = np.unique(idx, return_index=True, return_counts=True)
    if np.any(counts > 1):
        row = int(np.min(first[counts > 1]))
        raise ValueError(f"{origin}: column 'idx' row {row}: idx {idx[row]} is repeated")
    return idx


def load_hidden(
    name: str, hub_path: str = ""
) -> list[tuple[str, tuple[list[str], ...], np.ndarray]]:
    """The hidden test rows of suite task `name`: (submission file name, texts (one list per text
    column of the registry task), idx) per hidden split: one for most tasks, three for MNLI
    (test_matched, test_mismatched and AX's test). Every row of the split, in file order; `idx`
    is the hub's `idx` column, which is what the submission is keyed by.

    hub_path: a local snapshot or a mirror of nyu-mll/glue (as data.hub_path); "" = the hub.
    """
    entry = _entry(name)
    task = get_task(entry.task)
    repo = _repo(task, hub_path)
    out = []
    for config, split, file_name in entry.submissions:
        frame, origin = _read_split(repo, config, split)
        missing = [c for c in task.text_columns if c not in frame.columns]
        if missing:
            raise ValueError(
                f"{origin}: missing text column(s) {missing} of task {task.name!r}; columns "
                f"present: {list(frame.columns)}"
            )
        texts = tuple(sources._texts(frame, column, origin) for column in task.text_columns)
        out.append((file_name, texts, _idx(frame, origin)))
    return out


def load_labelled(task: str | TaskSpec, hub_split: str, hub_path: str = "") -> sources.Examples:
    """The labelled rows of `hub_split` (a split of the task's hub dataset, e.g. MNLI's
    "validation_matched"), validated and mapped as `load_examples` does for the task's own splits.

    task: a registry name or a TaskSpec (e.g. from task_for_config, whose hub name may already be
    a data.hub_path); hub_path: read this snapshot or mirror instead. A split whose labels are
    hidden (-1, GLUE's test splits) is refused: use load_hidden.
    """
    task = get_task(task) if isinstance(task, str) else task
    if task.hub_name is None:
        raise ValueError(f"task {task.name!r} has no hub dataset to read {hub_split!r} from")
    repo = _repo(task, hub_path)
    frame, origin = _read_split(repo, task.hub_config, hub_split)
    if task.label_column not in frame.columns:
        raise ValueError(
            f"{origin}: no label column {task.label_column!r}; columns present: "
            f"{list(frame.columns)}"
        )
    hidden = pd.to_numeric(frame[task.label_column], errors="coerce") == -1
    if hidden.any() and -1 not in task.drop_labels:
        row = int(np.argmax(hidden.to_numpy()))
        raise ValueError(
            f"{origin}: row {row} has the hidden label -1 ({int(hidden.sum())} of {len(frame)} "
            "rows): its labels are not public; use glue.load_hidden for a test split"
        )
    spec = dataclasses.replace(task, hub_name=repo, splits={"test": hub_split})
    return sources.load_examples(spec, "test", source="hub")


def submission_labels(name: str, predictions) -> list[str]:
    """What the GLUE server expects for each prediction of suite task `name` (or "ax"): class ids
    -> "0"/"1", "entailment"/"not_entailment" or "entailment"/"neutral"/"contradiction"
    (SuiteTask.answers); STS-B scores -> clipped to [0, 5], 3 decimals."""
    entry = _entry(name)
    values = np.asarray(predictions)
    if values.ndim == 2 and values.shape[1] == 1:  # a regression head's trailing axis
        values = values[:, 0]
    if values.ndim != 1:
        raise ValueError(f"{entry.title}: predictions must be 1-D, got shape {values.shape}")
    if entry.answers is None:
        scores = values.astype(np.float64)
        bad = ~np.isfinite(scores)
        if bad.any():
            raise ValueError(f"{entry.title}: prediction {int(np.argmax(bad))} is not finite")
        # + 0.0 turns a clipped -0.0 into 0.0, which would print as "-0.000".
        return [f"{score:.3f}" for score in np.clip(scores, 0.0, 5.0) + 0.0]
    if values.size and not np.issubdtype(values.dtype, np.integer):
        as_float = values.astype(np.float64)
        if not np.all(np.isfinite(as_float) & (as_float == np.round(as_float))):
            raise ValueError(f"{entry.title}: predictions must be class ids, got {values.dtype}")
    ids = values.astype(np.int64)
    bad = (ids < 0) | (ids >= len(entry.answers))
    if bad.any():
        position = int(np.argmax(bad))
        raise ValueError(
            f"{entry.title}: prediction {position} is class {ids[position]}, not in "
            f"[0, {len(entry.answers)})"
        )
    return [entry.answers[i] for i in ids]


def _check_labels(file_name: str, labels: Sequence[str]) -> None:
    entry = _FILE_TASK[file_name]
    for position, label in enumerate(labels):
        if entry.answers is None:
            try:
                score = float(label)
            except (TypeError, ValueError):
                score = math.nan
            ok = isinstance(label, str) and 0.0 <= score <= 5.0
        else:
            ok = label in entry.answers
        if not ok:
            allowed = "a score in [0, 5]" if entry.answers is None else list(entry.answers)
            raise ValueError(
                f"{file_name}: prediction {position} is {label!r}, not {allowed} (use "
                "glue.submission_labels)"
            )


def _tsv(file_name: str, idx, labels: Sequence[str], allow_partial: bool) -> str:
    idx = np.asarray(idx)
    labels = list(labels)
    if idx.ndim != 1 or len(idx) != len(labels):
        raise ValueError(f"{file_name}: {idx.shape} idx for {len(labels)} predictions")
    if len(idx) and not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"{file_name}: idx must be integers, got {idx.dtype}")
    _check_labels(file_name, labels)
    order = np.argsort(idx, kind="stable")
    ordered = idx[order]
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if repeated.size:
        raise ValueError(f"{file_name}: idx {int(repeated[0])} appears more than once")
    if not allow_partial and not np.array_equal(ordered, np.arange(len(ordered))):
        raise ValueError(
            f"{file_name}: idx must be 0..n-1 (every test row once); got {len(ordered)} rows "
            f"from {ordered.min() if len(ordered) else '-'} to "
            f"{ordered.max() if len(ordered) else '-'} (allow_partial=True for a test archive)"
        )
    out = io.StringIO()
    writer = csv.writer(out, delimiter="\t", lineterminator="\n")
    writer.writerow(HEADER)
    writer.writerows((int(idx[i]), labels[i]) for i in order)
    return out.getvalue()


def write_submission(
    files: Mapping[str, tuple[np.ndarray, Sequence[str]]],
    path: str | os.PathLike,
    *,
    allow_partial: bool = False,
) -> Path:
    """Writes the gluebenchmark.com archive `path` (a zip, one TSV per file at its top level) and
    returns it.

    files: submission file name (SUBMISSION_FILES) -> (idx, labels): the hub's idx of each test
    row and its label string (submission_labels), in any order; rows are written sorted by idx
    under the header "index\\tprediction". Refused: a file of the official 11 missing, an unknown
    file name, labels the server would not read, repeated idx, and idx that are not 0..n-1;
    `allow_partial=True` lets files and rows be missing (an archive for a test, not the server).
    """
    unknown = sorted(set(files) - set(SUBMISSION_FILES))
    if unknown:
        raise ValueError(
            f"unknown submission file(s) {unknown}; GLUE's are {', '.join(SUBMISSION_FILES)}"
        )
    missing = [name for name in SUBMISSION_FILES if name not in files]
    if missing and not allow_partial:
        raise ValueError(
            f"the submission lacks {len(missing)} of GLUE's 11 files: {', '.join(missing)} "
            "(allow_partial=True to write it anyway)"
        )
    contents = {
        name: _tsv(name, *files[name], allow_partial=allow_partial)
        for name in SUBMISSION_FILES
        if name in files
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, text in contents.items():
            archive.writestr(name, text)
    os.replace(partial, path)  # a reader never sees half an archive
    return path


def _task_scores(rows: Mapping[str, Mapping[str, float]]) -> dict[str, list[float]]:
    """{suite name: its metric values as percentages, in SuiteTask.metrics order} for the tasks
    in rows, with every value checked."""
    unknown = sorted(set(rows) - set(SUITE))
    if unknown:
        raise ValueError(f"rows for unknown task(s) {unknown}; the suite is {', '.join(SUITE)}")
    out = {}
    for name, entry in SUITE.items():
        if name not in rows:
            continue
        values = []
        for key in entry.metrics:
            if key not in rows[name]:
                raise ValueError(
                    f"{entry.title}: rows[{name!r}] lacks {key!r}; it needs {list(entry.metrics)} "
                    f"and has {sorted(rows[name])}"
                )
            value = float(rows[name][key])
            if not -1.0 <= value <= 1.0:
                raise ValueError(
                    f"{entry.title}: {key} = {value} is outside [-1, 1]; rows hold fractions "
                    "(0.853), as results.json does, not percentages"
                )
            values.append(100.0 * value)
        out[name] = values
    return out


def glue_score(rows: Mapping[str, Mapping[str, float]], *, allow_partial: bool = False) -> float:
    """The GLUE score in percent: the mean over tasks of each task's mean of its metrics (MNLI's
    matched and mismatched accuracy are averaged into one task score, as on the leaderboard).

    rows: {suite name: {key: value}} with the keys of SuiteTask.metrics (fractions). All nine
    tasks are needed, unless allow_partial (then the mean over the tasks given).
    """
    scores = _task_scores(rows)
    missing = [SUITE[name].title for name in SUITE if name not in scores]
    if missing and (not allow_partial or not scores):
        raise ValueError(f"the GLUE score needs all nine tasks; missing: {', '.join(missing)}")
    return float(np.mean([np.mean(values) for values in scores.values()]))


def format_table(rows: Mapping[str, Mapping[str, float]]) -> str:
    """A markdown table in the GLUE paper's layout: one line per task (task, metric(s), values as
    percentages with one decimal, two metrics as "F1/Acc." etc., MNLI as m/mm; "-" for a task
    not in rows), then "Score", the GLUE score (glue_score; over the tasks given, and said so,
    when some are missing)."""
    scores = _task_scores(rows)
    lines = ["| Task | Metric | Result |", "|:--|:--|--:|"]
    for name, entry in SUITE.items():
        shown = "/".join(f"{v:.1f}" for v in scores[name]) if name in scores else "-"
        lines.append(f"| {entry.title} | {entry.metric_label} | {shown} |")
    if scores:
        score = f"{glue_score(rows, allow_partial=True):.1f}"
    else:
        score = "-"
    label = "GLUE score" if len(scores) == len(SUITE) else f"GLUE score ({len(scores)} of 9 tasks)"
    lines.append(f"| Score | {label} | {score} |")
    return "\n".join(lines) + "\n"
