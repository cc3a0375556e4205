"""pifi_jax/train/predict.py beyond the trained runs of test_local_tasks, test_pifi and
test_generative (which check that predictions equal the run's own evaluation): a run with no
validation split, what inputs are refused and how, and the output formats."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest

from pifi_jax.train import checkpoint, train_and_evaluate
from pifi_jax.train.partition import flatten
from pifi_jax.train.predict import Predictor, read_inputs, write_records
from tests.conftest import load_config, tiny_overrides


@pytest.fixture(scope="module")
def run_without_validation(tiny_bert_dir, tiny_task_files, tmp_path_factory):
    files = {"train": tiny_task_files["train"]}
    config = load_config("configs/classify.py:runlocal", tiny_overrides(tiny_bert_dir, files))
    workdir = tmp_path_factory.mktemp("no_validation")
    train_and_evaluate(config, workdir)
    return workdir


def test_a_run_without_best_checkpoint_predicts_from_the_latest(
    run_without_validation, tiny_task_files
):
    assert not (run_without_validation / "checkpoints" / "best").exists() or not list(
        (run_without_validation / "checkpoints" / "best").iterdir()
    )
    predictor = Predictor.from_workdir(run_without_validation)
    assert predictor.checkpoint.startswith("latest (step 2")
    # The parameters are the latest checkpoint's, read without the optimizer state.
    ckpt = checkpoint.Checkpointer(run_without_validation / "checkpoints")
    try:
        state, _ = ckpt.restore(None)
    finally:
        ckpt.close()
    mine, saved = flatten(predictor.params), flatten(state["params"])
    assert set(mine) == set(saved)
    for path, value in saved.items():
        np.testing.assert_array_equal(np.asarray(mine[path]), np.asarray(value), err_msg=path)
    texts = pd.read_csv(tiny_task_files["test"])["text"].tolist()[:5]
    rows = predictor.predict((texts,))
    assert [r["text"] for r in rows] == texts
    assert all(r["label"] in ("negative", "positive") for r in rows)


def test_inputs_are_refused_with_file_column_and_line(run_without_validation, tmp_path):
    predictor = Predictor.from_workdir(run_without_validation)
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,label\nfine,1\n")
    with pytest.raises(ValueError, match=r"bad\.csv: missing text column 'text'.*'sentence'"):
        predictor.predict_file(bad, tmp_path / "out.jsonl")
    bad.write_text("text,label\nfine,1\n,0\n")
    with pytest.raises(ValueError, match=r"bad\.csv: column 'text' row 1: missing or empty"):
        predictor.predict_file(bad, tmp_path / "out.jsonl")
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        predictor.predict_file(tmp_path / "nowhere.csv")
    bad.write_text("text\nfine\n")
    with pytest.raises(ValueError, match=r"out\.xlsx: unknown output type"):
        predictor.predict_file(bad, tmp_path / "out.xlsx")
    with pytest.raises(ValueError, match=r"reads 1 text column\(s\) \['text'\], got 2"):
        predictor.predict((["a"], ["b"]))
    assert not (tmp_path / "out.jsonl").exists()


def test_a_directory_that_is_not_a_run_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        Predictor.from_workdir(tmp_path)
    (tmp_path / "config.json").write_text(
        load_config("configs/classify.py:runlocal").to_json_best_effort()
    )
    with pytest.raises(FileNotFoundError, match="saved no checkpoint"):
        Predictor.from_workdir(tmp_path)


def test_lines_single_texts_and_tab_separated_pairs():
    lines = io.StringIO("first text\n\n  second one\n")
    assert read_inputs_from(lines, ("text",)) == (["first text", "  second one"],)
    pairs = io.StringIO("a premise\ta hypothesis\nb\tc\n")
    assert read_inputs_from(pairs, ("premise", "hypothesis")) == (
        ["a premise", "b"],
        ["a hypothesis", "c"],
    )
    with pytest.raises(ValueError, match="stdin line 2: 1 tab-separated field"):
        read_inputs_from(io.StringIO("a\tb\nno tab\n"), ("premise", "hypothesis"))
    with pytest.raises(ValueError, match="stdin line 1: empty text"):
        read_inputs_from(io.StringIO("\tb\n"), ("premise", "hypothesis"))
    with pytest.raises(ValueError, match="stdin: no input text"):
        read_inputs_from(io.StringIO("\n\n"), ("text",))


def read_inputs_from(stream, columns):
    import sys

    saved, sys.stdin = sys.stdin, stream
    try:
        return read_inputs("-", columns)
    finally:
        sys.stdin = saved


def test_input_column_map_and_text_files(tmp_path):
    path = tmp_path / "in.tsv"
    pd.DataFrame({"review": ["good", "bad"], "other": [1, 2]}).to_csv(path, sep="\t", index=False)
    assert read_inputs(path, ("text",), {"text": "review"}) == (["good", "bad"],)
    lines = tmp_path / "in.txt"
    lines.write_text("one\ntwo\n")
    assert read_inputs(lines, ("text",)) == (["one", "two"],)


def test_output_formats(tmp_path, capsys):
    records = [
        {"text": "a, b", "label": "x", "probabilities": {"x": 0.75, "y": 0.25}},
        {"text": "c", "label": "y", "probabilities": {"x": 0.125, "y": 0.875}},
    ]
    write_records(records, tmp_path / "o.csv")
    frame = pd.read_csv(tmp_path / "o.csv")
    assert frame.to_dict("list") == {
        "text": ["a, b", "c"],
        "label": ["x", "y"],
        "p:x": [0.75, 0.125],
        "p:y": [0.25, 0.875],
    }
    write_records(records, tmp_path / "sub" / "o.jsonl")
    assert [json.loads(x) for x in open(tmp_path / "sub" / "o.jsonl")] == records
    write_records(records, None)
    assert [json.loads(x) for x in capsys.readouterr().out.splitlines()] == records


def test_a_read_only_checkpointer_saves_nothing(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path / "c", best_metric="m", read_only=True)
    try:
        with pytest.raises(PermissionError, match="read-only"):
            ckpt.save(1, {"x": np.zeros(2)}, {})
        with pytest.raises(PermissionError, match="read-only"):
            ckpt.save_best(1, {"x": np.zeros(2)}, {"m": 1.0})
    finally:
        ckpt.close()


def test_big_inputs_get_a_progress_bar(run_without_validation, capsys):
    predictor = Predictor.from_workdir(run_without_validation)
    texts = [f"good film number {i}" for i in range(6)]
    predictor.predict((texts,), batch_size=1)  # 6 batches: a bar on stderr
    assert "predict: 100%" in capsys.readouterr().err
    predictor.predict((texts,), batch_size=8)  # one batch: none
    assert "predict" not in capsys.readouterr().err
