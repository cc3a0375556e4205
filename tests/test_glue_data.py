"""The data side of the GLUE suite: the fake nyu-mll/glue snapshot read offline through
`datasets` and data.hub_path, hidden test rows keyed by idx, the submission archive, the score
table and the F1 of class 1."""

from __future__ import annotations

import csv
import io
import socket
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pifi_jax import data
from pifi_jax.data import glue
from pifi_jax.data.tasks import get_task
from pifi_jax.train.metrics import compute_metrics
from tests.conftest import load_config
from tests.glue_fixture import GLUE_CONFIGS, is_hidden, parquet_name, write_glue_snapshot

ROWS = 24


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    """No network at all (a connection attempt fails the test), hub offline mode, and a private
    datasets cache."""
    import datasets
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_cache"))
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket, "create_connection", refuse)
        yield


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Path:
    return write_glue_snapshot(tmp_path_factory.mktemp("glue_snapshot"), rows=ROWS, seed=0)


def _parquet(root: Path, config: str, split: str) -> pd.DataFrame:
    return pd.read_parquet(root / parquet_name(config, split))


# ---------------------------------------------------------------- the snapshot


def test_snapshot_reads_offline_for_every_config_and_split(snapshot):
    import datasets

    for config, (text_columns, label_names, splits) in GLUE_CONFIGS.items():
        assert list(datasets.load_dataset(str(snapshot), config)) == list(splits), config
        for split in splits:
            dataset = datasets.load_dataset(str(snapshot), config, split=split)
            assert dataset.column_names == [*text_columns, "label", "idx"], (config, split)
            frame = dataset.to_pandas()
            assert len(frame) == ROWS
            assert frame[list(text_columns)].map(lambda t: len(t.split()) >= 2).all().all()
            label = dataset.features["label"]
            if label_names is None:
                assert label.dtype == "float32"
            else:
                assert label.names == list(label_names)
            idx = frame["idx"].to_numpy()
            if is_hidden(split):
                assert (frame["label"] == -1).all()
                assert sorted(idx) == list(range(ROWS)) and list(idx) != list(range(ROWS))
            else:
                assert list(idx) == list(range(ROWS))
                labels = frame["label"].to_numpy()
                if label_names is None:
                    assert labels.dtype == np.float32 and 0 <= labels.min() <= labels.max() <= 5
                else:
                    assert set(labels) <= set(range(len(label_names)))


def test_snapshot_is_deterministic(tmp_path):
    a = write_glue_snapshot(tmp_path / "a", rows=6, seed=3)
    b = write_glue_snapshot(tmp_path / "b", rows=6, seed=3)
    c = write_glue_snapshot(tmp_path / "c", rows=6, seed=4)
    assert _parquet(a, "qnli", "train").equals(_parquet(b, "qnli", "train"))
    assert not _parquet(a, "qnli", "train").equals(_parquet(c, "qnli", "train"))
    assert (a / "README.md").read_text() == (b / "README.md").read_text()
    d = write_glue_snapshot(tmp_path / "d", rows=6, sizes={("rte", "test"): 9})
    assert len(_parquet(d, "rte", "test")) == 9 and len(_parquet(d, "rte", "train")) == 6
    with pytest.raises(ValueError, match="unknown"):
        write_glue_snapshot(tmp_path / "e", sizes={("ax", "train"): 9})


# ---------------------------------------------------------------- suite and registry


def test_suite_entries_match_the_registry():
    assert list(glue.SUITE) == [
        "cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli",
    ]  # fmt: skip
    assert [e.title for e in glue.SUITE.values()] == [
        "CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI", "QNLI", "RTE", "WNLI",
    ]  # fmt: skip
    files = [f for e in glue.SUITE.values() for _, _, f in e.submissions]
    assert sorted(files) == sorted(glue.SUBMISSION_FILES) and len(files) == 11
    assert glue.SUITE["mnli"].submissions == (
        ("mnli", "test_matched", "MNLI-m.tsv"),
        ("mnli", "test_mismatched", "MNLI-mm.tsv"),
        ("ax", "test", "AX.tsv"),
    )
    for entry in glue.SUITE.values():
        task = get_task(entry.task)
        assert (task.hub_name, task.hub_config) == ("nyu-mll/glue", entry.config)
        assert task.splits == get_task("cola").splits or entry.name == "mnli"
        for key in entry.metrics:
            split, metric = key.split("/")
            assert metric in task.metrics and split in ("test", "matched", "mismatched")
        if entry.answers is None:
            assert task.is_regression
        else:  # a class id is the hub's label id, whose name the answer spells
            assert len(entry.answers) == task.num_labels
            assert task.label_map is None
            assert task.label_names == GLUE_CONFIGS[entry.config][1]
    assert glue.SUITE["sst2"].task == "glue_sst2"
    sst2 = get_task("glue_sst2")
    assert sst2.tfds_name == "glue/sst2" and sst2.label_names == ("negative", "positive")
    assert get_task("sst2").hub_name == "SetFit/sst2"  # unchanged


def test_f1_matches_sklearn_and_the_registry_uses_it():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(1, 40))
        labels = rng.integers(0, 2, n)
        predictions = rng.integers(0, 2, n) if trial % 5 else np.zeros(n, int)
        if trial == 0:
            labels = np.zeros(n, int)  # class 1 nowhere: 0, as sklearn's zero_division
        weights = rng.integers(0, 2, n)
        weights[0] = 1
        keep = weights != 0
        got = compute_metrics(["f1"], predictions, labels, weights)["f1"]
        want = f1_score(labels[keep], predictions[keep], zero_division=0)
        assert got == pytest.approx(want, abs=1e-12), trial
    for name in ("mrpc", "qqp"):
        task = get_task(name)
        assert task.metrics == ("accuracy", "f1", "f1_macro")
        assert task.primary_metric == "accuracy"
    assert "f1" not in get_task("rte").metrics
    import dataclasses

    with pytest.raises(ValueError, match="'f1'.*2 labels"):
        dataclasses.replace(get_task("mnli"), metrics=("accuracy", "f1"))


# ---------------------------------------------------------------- hidden and labelled rows


def test_load_hidden_returns_texts_and_idx_from_the_file(snapshot):
    for name, entry in glue.SUITE.items():
        out = glue.load_hidden(name, str(snapshot))
        assert [file for file, _, _ in out] == [file for _, _, file in entry.submissions]
        columns = get_task(entry.task).text_columns
        for (_, texts, idx), (config, split, _) in zip(out, entry.submissions, strict=True):
            frame = _parquet(snapshot, config, split)
            assert len(texts) == len(columns)
            for text, column in zip(texts, columns, strict=True):
                assert text == frame[column].tolist()
            np.testing.assert_array_equal(idx, frame["idx"].to_numpy())
            assert not np.array_equal(idx, np.arange(len(idx)))


def test_load_hidden_errors(tmp_path):
    root = write_glue_snapshot(tmp_path / "glue", rows=4, seed=1)
    (root / parquet_name("rte", "test")).unlink()
    with pytest.raises(ValueError, match="config 'rte' split 'test'"):
        glue.load_hidden("rte", str(root))
    frame = _parquet(root, "wnli", "test")
    frame.loc[2, "sentence2"] = "  "
    frame.to_parquet(root / parquet_name("wnli", "test"))
    with pytest.raises(ValueError, match=r"wnli\[test\].*'sentence2' row 2: missing or empty"):
        glue.load_hidden("wnli", str(root))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        glue.load_hidden("cola", str(tmp_path / "nowhere"))
    with pytest.raises(KeyError, match="not a GLUE suite task"):
        glue.load_hidden("snli", str(root))


def test_load_labelled_reads_another_hub_split(snapshot):
    examples = glue.load_labelled("mnli", "validation_matched", str(snapshot))
    frame = _parquet(snapshot, "mnli", "validation_matched")
    assert examples.texts == (frame["premise"].tolist(), frame["hypothesis"].tolist())
    np.testing.assert_array_equal(examples.labels, frame["label"].to_numpy())
    assert examples.labels.dtype == np.int32 and "validation_matched" in examples.origin
    # A task from task_for_config already carries its hub_path.
    task = data.task_for_config(_config("mnli", snapshot))
    again = glue.load_labelled(task, "validation_matched")
    assert again.texts == examples.texts
    with pytest.raises(ValueError, match="hidden label -1.*load_hidden"):
        glue.load_labelled("mnli", "test_matched", str(snapshot))
    with pytest.raises(ValueError, match="hidden label -1"):
        glue.load_labelled("stsb", "test", str(snapshot))  # float labels: -1.0 is refused too


# ---------------------------------------------------------------- submission

# What the server reads for each class id, written out here apart from glue.SUITE.
_ANSWERS = {
    "CoLA.tsv": ["0", "1"],
    "SST-2.tsv": ["0", "1"],
    "MRPC.tsv": ["0", "1"],
    "QQP.tsv": ["0", "1"],
    "WNLI.tsv": ["0", "1"],
    "MNLI-m.tsv": ["entailment", "neutral", "contradiction"],
    "MNLI-mm.tsv": ["entailment", "neutral", "contradiction"],
    "AX.tsv": ["entailment", "neutral", "contradiction"],
    "QNLI.tsv": ["entailment", "not_entailment"],
    "RTE.tsv": ["entailment", "not_entailment"],
}


def test_submission_labels():
    assert glue.submission_labels("mnli", [2, 0, 1]) == ["contradiction", "entailment", "neutral"]
    assert glue.submission_labels("ax", np.array([1])) == ["neutral"]
    assert glue.submission_labels("rte", [1, 0]) == ["not_entailment", "entailment"]
    assert glue.submission_labels("qnli", np.array([0, 1])) == ["entailment", "not_entailment"]
    assert glue.submission_labels("wnli", [1, 0]) == ["1", "0"]  # hub id 1 = entailment
    for name in ("cola", "sst2", "mrpc", "qqp"):
        assert glue.submission_labels(name, np.array([0, 1, 1])) == ["0", "1", "1"]
    scores = np.array([-0.2, -0.0, 0.0004, 2.34567, 4.9996, 7.0], np.float32)
    got = glue.submission_labels("stsb", scores[:, None])
    assert got == ["0.000", "0.000", "0.000", "2.346", "5.000", "5.000"]
    with pytest.raises(ValueError, match="class 2, not in"):
        glue.submission_labels("rte", [0, 2])
    with pytest.raises(ValueError, match="class ids"):
        glue.submission_labels("cola", [0.5])
    with pytest.raises(ValueError, match="not finite"):
        glue.submission_labels("stsb", [1.0, np.nan])


def _expected_stsb(value: float) -> str:
    clipped = min(max(float(value), 0.0), 5.0)
    return f"{clipped:.3f}" if clipped != 0 else "0.000"


def _predictions(snapshot, seed=0):
    """Random predictions for every hidden row: {file: (idx, labels)} and, independently,
    {file: {idx: expected prediction string}}."""
    rng = np.random.default_rng(seed)
    files, expected = {}, {}
    for name in glue.SUITE:
        for file, _, idx in glue.load_hidden(name, str(snapshot)):
            if file == "STS-B.tsv":
                raw = rng.uniform(-1.0, 6.0, len(idx))
                want = [_expected_stsb(v) for v in raw]
            else:
                raw = rng.integers(0, len(_ANSWERS[file]), len(idx))
                want = [_ANSWERS[file][i] for i in raw]
            files[file] = (idx, glue.submission_labels(name, raw))
            expected[file] = dict(zip(idx.tolist(), want, strict=True))
    return files, expected


def _read_zip(path) -> dict[str, list[list[str]]]:
    with zipfile.ZipFile(path) as archive:
        return {
            name: list(csv.reader(io.StringIO(archive.read(name).decode()), delimiter="\t"))
            for name in archive.namelist()
        }


def test_write_submission_writes_the_official_files_sorted_by_idx(snapshot, tmp_path):
    files, expected = _predictions(snapshot)
    path = glue.write_submission(files, tmp_path / "out" / "submission.zip")
    assert path == tmp_path / "out" / "submission.zip"
    tables = _read_zip(path)
    assert sorted(tables) == sorted(glue.SUBMISSION_FILES)  # top level, no folder
    for file, rows in tables.items():
        assert rows[0] == ["index", "prediction"]
        body = rows[1:]
        assert [int(index) for index, _ in body] == list(range(ROWS))
        assert all(len(row) == 2 for row in body)
        assert {int(index): label for index, label in body} == expected[file]
    # Written by row number instead of idx, the files would differ.
    cola_idx, cola_labels = files["CoLA.tsv"]
    by_row = [cola_labels[i] for i in range(ROWS)]
    by_idx = [label for _, label in tables["CoLA.tsv"][1:]]
    assert by_row != by_idx or len(set(cola_labels)) == 1
    with zipfile.ZipFile(path) as archive:
        raw = archive.read("MNLI-m.tsv").decode()
    assert raw.startswith("index\tprediction\n") and "\r" not in raw


def test_write_submission_refusals(snapshot, tmp_path):
    files, _ = _predictions(snapshot, seed=1)
    partial = {k: v for k, v in files.items() if k not in ("AX.tsv", "QQP.tsv")}
    with pytest.raises(ValueError, match="lacks 2 of GLUE's 11 files: QQP.tsv, AX.tsv"):
        glue.write_submission(partial, tmp_path / "a.zip")
    assert not (tmp_path / "a.zip").exists()
    written = glue.write_submission(partial, tmp_path / "b.zip", allow_partial=True)
    assert sorted(_read_zip(written)) == sorted(partial)
    with pytest.raises(ValueError, match="unknown submission file.*MNLI.tsv"):
        glue.write_submission({**files, "MNLI.tsv": files["MNLI-m.tsv"]}, tmp_path / "c.zip")
    idx, labels = files["RTE.tsv"]
    bad = {**files, "RTE.tsv": (idx, ["yes"] + labels[1:])}
    with pytest.raises(ValueError, match="RTE.tsv: prediction 0 is 'yes'"):
        glue.write_submission(bad, tmp_path / "d.zip")
    bad = {**files, "STS-B.tsv": (files["STS-B.tsv"][0], ["5.5"] * ROWS)}
    with pytest.raises(ValueError, match="STS-B.tsv: prediction 0 is '5.5'"):
        glue.write_submission(bad, tmp_path / "d.zip")
    repeated = np.concatenate([idx[:-1], idx[:1]])
    with pytest.raises(ValueError, match="RTE.tsv: idx .* more than once"):
        glue.write_submission({**files, "RTE.tsv": (repeated, labels)}, tmp_path / "e.zip")
    with pytest.raises(ValueError, match="RTE.tsv: idx must be 0..n-1"):
        glue.write_submission({**files, "RTE.tsv": (idx[1:], labels[1:])}, tmp_path / "f.zip")
    with pytest.raises(ValueError, match="RTE.tsv: .* for 23 predictions"):
        glue.write_submission({**files, "RTE.tsv": (idx, labels[1:])}, tmp_path / "g.zip")


# ---------------------------------------------------------------- score and table

_ROWS = {
    "cola": {"test/mcc": 0.5, "test/accuracy": 0.8},  # extra keys are ignored
    "sst2": {"test/accuracy": 0.9},
    "mrpc": {"test/f1": 0.88, "test/accuracy": 0.84},
    "stsb": {"test/pearson": 0.86, "test/spearman": 0.85},
    "qqp": {"test/f1": 0.70, "test/accuracy": 0.88},
    "mnli": {"matched/accuracy": 0.84, "mismatched/accuracy": 0.83},
    "qnli": {"test/accuracy": 0.90},
    "rte": {"test/accuracy": 0.66},
    "wnli": {"test/accuracy": 0.56},
}


def test_glue_score_and_table():
    # Task scores 50, 90, 86, 85.5, 79, 83.5, 90, 66, 56: their sum is 686.
    assert glue.glue_score(_ROWS) == pytest.approx(686 / 9)
    table = glue.format_table(_ROWS)
    lines = table.strip().splitlines()
    assert lines[0] == "| Task | Metric | Result |"
    assert lines[2:] == [
        "| CoLA | MCC | 50.0 |",
        "| SST-2 | Acc. | 90.0 |",
        "| MRPC | F1/Acc. | 88.0/84.0 |",
        "| STS-B | Pearson/Spearman | 86.0/85.0 |",
        "| QQP | F1/Acc. | 70.0/88.0 |",
        "| MNLI | Acc. m/mm | 84.0/83.0 |",
        "| QNLI | Acc. | 90.0 |",
        "| RTE | Acc. | 66.0 |",
        "| WNLI | Acc. | 56.0 |",
        "| Score | GLUE score | 76.2 |",
    ]
    no_cola = {k: v for k, v in _ROWS.items() if k != "cola"}
    with pytest.raises(ValueError, match="needs all nine tasks; missing: CoLA"):
        glue.glue_score(no_cola)
    assert glue.glue_score(no_cola, allow_partial=True) == pytest.approx((686 - 50) / 8)
    partial = glue.format_table(no_cola)
    assert "| CoLA | MCC | - |" in partial
    assert "| Score | GLUE score (8 of 9 tasks) | 79.5 |" in partial
    with pytest.raises(ValueError, match="lacks 'matched/accuracy'"):
        glue.glue_score({**_ROWS, "mnli": {"test/accuracy": 0.8}})
    with pytest.raises(ValueError, match="fractions"):
        glue.glue_score({**_ROWS, "rte": {"test/accuracy": 66.0}})
    with pytest.raises(ValueError, match="unknown task"):
        glue.format_table({**_ROWS, "ax": {"test/accuracy": 0.5}})


# ---------------------------------------------------------------- data.hub_path


def _config(task: str, hub_path, *overrides):
    return load_config(
        "configs/classify.py",
        [f"--config.task={task}", f"--config.data.hub_path={hub_path}", *overrides],
    )


def test_hub_path_reads_the_snapshot_with_the_task_split_rule(snapshot):
    task = data.task_for_config(_config("cola", snapshot))
    assert task.hub_name == str(snapshot) and task.splits == get_task("cola").splits
    train, validation, test = (data.load_examples(task, s) for s in ("train", "validation", "test"))
    source_train = _parquet(snapshot, "cola", "train")
    pairs = lambda ex: sorted(zip(ex.texts[0], ex.labels.tolist(), strict=True))  # noqa: E731
    rows = sorted(zip(source_train["sentence"], source_train["label"].tolist(), strict=True))
    assert sorted(pairs(train) + pairs(validation)) == rows
    assert len(validation) == ROWS - ROWS * 80 // 100
    assert not set(train.rows) & set(validation.rows)
    source_test = _parquet(snapshot, "cola", "validation")
    assert test.texts == (source_test["sentence"].tolist(),)
    np.testing.assert_array_equal(test.labels, source_test["label"].to_numpy())
    # GLUE's SST-2 reads config sst2 of the snapshot; STS-B its float scores.
    sst2 = data.load_examples(data.task_for_config(_config("glue_sst2", snapshot)), "test")
    assert sst2.texts == (_parquet(snapshot, "sst2", "validation")["sentence"].tolist(),)
    stsb = data.load_examples(data.task_for_config(_config("stsb", snapshot)), "test")
    np.testing.assert_allclose(stsb.labels, _parquet(snapshot, "stsb", "validation")["label"])
    assert get_task("cola").hub_name == "nyu-mll/glue"  # the registry is untouched


def test_hub_path_refusals(snapshot, tmp_path):
    with pytest.raises(ValueError, match="task 'rt' has no hub dataset"):
        data.task_for_config(_config("rt", snapshot))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        data.task_for_config(_config("cola", tmp_path / "missing"))
    with pytest.raises(ValueError, match="source='tfds'"):
        data.task_for_config(_config("cola", snapshot, "--config.data.source=tfds"))
    local = "--config.data.data_files.train=train.csv"
    with pytest.raises(ValueError, match="reads local files"):
        data.task_for_config(_config("cola", snapshot, local))
    mirror = data.task_for_config(_config("cola", "someone/glue-mirror"))
    assert mirror.hub_name == "someone/glue-mirror"  # a repo id is passed on as it is
    assert data.task_for_config(_config("cola", "")).hub_name == "nyu-mll/glue"
