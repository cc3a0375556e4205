"""The GLUE suite end to end (pifi_jax/train/glue_suite.py, launch/glue.py) on a tiny fake
snapshot of nyu-mll/glue read through data.hub_path: nine runs of the tiny BERT (two steps
each), the table, and the submission archive checked against what the runs' own evaluations
predicted on the same texts."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import zipfile

import numpy as np
import pandas as pd
import pytest

from pifi_jax.data import glue
from pifi_jax.train import glue_suite
from tests.conftest import REPO, load_config, subprocess_env
from tests.glue_fixture import parquet_name, write_glue_snapshot
from tests.test_glue_data import offline  # noqa: F401 (the module's no-network fixture)

# The registry's MNLI keeps GLUE's last 9832 training rows for validation.
SIZES = {("mnli", "train"): 9840}
# Tasks whose hidden test split the test replaces by its validation split, permuted.
MIRRORED = {"sst2": "validation", "stsb": "validation", "mnli": "validation_mismatched"}


def _mirror_validation_as_test(root, config, split):
    """The hidden test split := the labelled `split`'s rows in a shuffled order, idx their
    position in `split`, labels hidden; returns the permutation (test row -> split row)."""
    source = pd.read_parquet(root / parquet_name(config, split))
    order = np.random.default_rng(7).permutation(len(source))
    test = source.iloc[order].reset_index(drop=True)
    test["idx"] = order.astype(np.int32)
    test["label"] = -1 if config != "stsb" else -1.0
    target = root / parquet_name(config, "test_mismatched" if config == "mnli" else "test")
    original = pd.read_parquet(target)
    test = test.astype(original.dtypes.to_dict())
    import pyarrow
    import pyarrow.parquet

    schema = pyarrow.parquet.read_schema(target)
    pyarrow.parquet.write_table(pyarrow.Table.from_pandas(test, schema=schema), target)


# The suite runs in a child python compiling at XLA level 0 (tests.conftest.subprocess_env):
# every number these tests compare comes from that child, MNLI's matched predictions included.
_SUITE_SCRIPT = """
import json, sys
from pathlib import Path
import pandas as pd
from pifi_jax.train import glue_suite
from pifi_jax.train.predict import Predictor
from tests.conftest import load_config
from tests.glue_fixture import parquet_name

workdir, overrides = Path(sys.argv[1]), json.loads(sys.argv[2])
config = load_config("configs/classify.py:runlocal", overrides)
results = glue_suite.run_suite(config, workdir, log=lambda *_: None)
(workdir / "suite.json").write_text(json.dumps(results))
# MNLI's matched validation rows, read from the snapshot's parquet file as they are
frame = pd.read_parquet(Path(config.data.hub_path) / parquet_name("mnli", "validation_matched"))
texts = (frame["premise"].tolist(), frame["hypothesis"].tolist())
rows = Predictor.from_workdir(workdir / "mnli").predict(texts)
(workdir / "matched.json").write_text(json.dumps([row["label"] for row in rows]))
"""


@pytest.fixture(scope="module")
def suite(tiny_bert_dir, tmp_path_factory):
    root = write_glue_snapshot(tmp_path_factory.mktemp("glue"), rows=24, seed=0, sizes=SIZES)
    for config, split in MIRRORED.items():
        _mirror_validation_as_test(root, config, split)
    overrides = [
        f"--config.model.path={tiny_bert_dir}",
        f"--config.data.hub_path={root}",
        "--config.data.max_length=16",
        "--config.data.buckets=(16,)",
        "--config.train.checkpoint_every_steps=2",
    ]
    workdir = tmp_path_factory.mktemp("suite")
    child = subprocess.run(
        [sys.executable, "-c", _SUITE_SCRIPT, str(workdir), json.dumps(overrides)],
        cwd=REPO,
        env=subprocess_env(1, quick_compile=True),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert child.returncode == 0, child.stderr[-4000:]
    config = load_config("configs/classify.py:runlocal", overrides)
    return config, workdir, json.loads((workdir / "suite.json").read_text())


def _archive(path) -> dict[str, list[list[str]]]:
    with zipfile.ZipFile(path) as archive:
        return {
            name: list(csv.reader(io.StringIO(archive.read(name).decode()), delimiter="\t"))
            for name in archive.namelist()
        }


def _predictions(run_dir):
    return [json.loads(line) for line in open(run_dir / "predictions_test.jsonl")]


@pytest.mark.slow  # trains the whole tiny suite (~1 min on a fresh machine)
def test_every_task_trains_and_the_table_has_the_study_layout(suite):
    config, workdir, results = suite
    assert set(results["rows"]) == set(glue.SUITE)
    for name, entry in glue.SUITE.items():
        saved = json.loads((workdir / name / "results.json").read_text())
        assert saved["steps"] == 2
        assert json.loads((workdir / name / "config.json").read_text())["task"] == entry.task
        for key in entry.metrics:
            value = results["rows"][name][key]
            if key.startswith("test/"):
                assert value == saved[key]
    mnli = results["rows"]["mnli"]
    assert (
        mnli["mismatched/accuracy"]
        == json.loads((workdir / "mnli/results.json").read_text())["test/accuracy"]
    )
    table = (workdir / "glue.md").read_text()
    assert table == results["table"] == glue.format_table(results["rows"])
    for title in ("CoLA | MCC", "MRPC | F1/Acc.", "STS-B | Pearson/Spearman", "MNLI | Acc. m/mm"):
        assert f"| {title} |" in table
    assert results["score"] == pytest.approx(glue.glue_score(results["rows"]))
    assert json.loads((workdir / "glue.json").read_text())["score"] == results["score"]


@pytest.mark.slow  # trains the whole tiny suite (~1 min on a fresh machine)
def test_mnli_matched_is_scored_on_validation_matched(suite):
    """The matched accuracy is that of the MNLI run's predictions on validation_matched (made by
    a Predictor of the run, in the suite's child)."""
    config, workdir, results = suite
    frame = pd.read_parquet(config.data.hub_path + "/" + parquet_name("mnli", "validation_matched"))
    predicted = json.loads((workdir / "matched.json").read_text())
    assert len(predicted) == len(frame)
    names = ["entailment", "neutral", "contradiction"]
    correct = [names[label] == row for label, row in zip(frame["label"], predicted, strict=True)]
    assert results["rows"]["mnli"]["matched/accuracy"] == pytest.approx(np.mean(correct))


@pytest.mark.slow  # trains the whole tiny suite (~1 min on a fresh machine)
def test_the_archive_holds_the_official_files_keyed_by_idx(suite):
    config, workdir, results = suite
    assert results["submission"] == str(workdir / "submission.zip")
    files = _archive(workdir / "submission.zip")
    assert sorted(files) == sorted(glue.SUBMISSION_FILES)
    root = config.data.hub_path
    hidden = {"MNLI-m.tsv": ("mnli", "test_matched"), "MNLI-mm.tsv": ("mnli", "test_mismatched")}
    hidden["AX.tsv"] = ("ax", "test")
    for name, rows in files.items():
        assert rows[0] == ["index", "prediction"], name
        config_name, split = hidden.get(name, (None, "test"))
        if config_name is None:
            entry = next(e for e in glue.SUITE.values() if e.submissions[0][2] == name)
            config_name = entry.config
        expected_rows = len(pd.read_parquet(f"{root}/{parquet_name(config_name, split)}"))
        assert [int(r[0]) for r in rows[1:]] == list(range(expected_rows)), name
    assert {r[1] for r in files["CoLA.tsv"][1:]} <= {"0", "1"}
    assert {r[1] for r in files["QNLI.tsv"][1:]} <= {"entailment", "not_entailment"}
    assert {r[1] for r in files["AX.tsv"][1:]} <= {"entailment", "neutral", "contradiction"}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sst2", "stsb", "mnli"])
def test_hidden_predictions_are_the_runs_own_on_the_same_texts(suite, name):
    """The test splits of these tasks hold their validation rows shuffled, idx = the row of
    validation; by idx, the archive must say what each run's evaluation predicted there."""
    config, workdir, results = suite
    file_name = {"sst2": "SST-2.tsv", "stsb": "STS-B.tsv", "mnli": "MNLI-mm.tsv"}[name]
    rows = _archive(workdir / "submission.zip")[file_name][1:]
    evaluated = _predictions(workdir / name)  # GLUE validation = our test split, in order
    if name == "stsb":
        expected = [f"{min(max(r['prediction'], 0.0), 5.0) + 0.0:.3f}" for r in evaluated]
    elif name == "mnli":
        names = ["entailment", "neutral", "contradiction"]
        expected = [names[r["prediction"]] for r in evaluated]
    else:
        expected = [str(r["prediction"]) for r in evaluated]
    assert [r[1] for r in rows] == expected


@pytest.mark.slow  # trains the whole tiny suite (~1 min on a fresh machine)
def test_a_finished_suite_is_not_trained_again(suite, monkeypatch):
    config, workdir, results = suite

    def refuse(*args, **kwargs):
        raise AssertionError("a finished task was trained again")

    monkeypatch.setattr(glue_suite.loop, "train_and_evaluate", refuse)
    again = glue_suite.run_suite(
        config, workdir, tasks=("cola", "rte"), submission=False, log=lambda *_: None
    )
    assert again["rows"]["cola"]["test/mcc"] == results["rows"]["cola"]["test/mcc"]
    assert again["score"] is None and again["submission"] is None
    assert "GLUE score (2 of 9 tasks)" in again["table"]
    with pytest.raises(ValueError, match="choose among cola"):
        glue_suite.run_suite(config, workdir, tasks=("squad",))
