"""Task "local": your own csv / tsv / jsonl files, no registry entry (pifi_jax/data/local.py).

Runs go through the command-line config path (configs/classify.py:task=local plus --config
overrides, parsed as launch/train.py parses them) on the tiny random BERT of conftest; two steps
each, so the metrics are only checked to be reported, not to be good. Each trained run is then
predicted from (pifi_jax/train/predict.py, launch/predict.py): the predictions must be the ones
the training loop's own evaluation of the best checkpoint wrote.
"""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import pifi_jax
from pifi_jax import data
from pifi_jax.train import objectives, train_and_evaluate
from pifi_jax.train.predict import Predictor
from tests.conftest import FILLER, NEGATIVE, POSITIVE, REPO, load_config, subprocess_env

# One cue word per class (all in the tiny tokenizer's vocabulary).
CUES = POSITIVE[:5]


def _rows(rng, labels, n, pair=False):
    """(text[, text_pair], label) rows whose text holds the cue word of its label."""
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]  # every label in every split
        words = rng.choices(FILLER, k=rng.randint(2, 6)) + [CUES[labels.index(label)]]
        rng.shuffle(words)
        row = [" ".join(words)]
        if pair:
            row.append(" ".join(rng.choices(FILLER + NEGATIVE, k=3)))
        rows.append([*row, label])
    return rows


def _write_csv(path, header, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def _task_files(directory, labels, header=("text", "label"), sizes=(40, 16, 16), seed=0):
    rng = random.Random(seed)
    pair = len(header) == 3
    return {
        split: _write_csv(directory / f"{split}.csv", header, _rows(rng, labels, n, pair))
        for split, n in zip(("train", "validation", "test"), sizes, strict=True)
    }


def _config(model_dir, files, *extra):
    """What a user types: --config=configs/classify.py:task=local,model=PATH plus the files."""
    overrides = [f"--config.data.data_files.{split}={path}" for split, path in files.items()]
    # One bucket and one checkpoint: fewer compiles and writes, so each run takes seconds.
    overrides += ["--config.data.max_length=16", "--config.data.buckets=(16,)"]
    overrides += ["--config.train.checkpoint_every_steps=2", *extra]
    return load_config(f"configs/classify.py:task=local,model={model_dir},runlocal", overrides)


def _launch_predict(workdir, *flags, stdin=None):
    """`python -m launch.predict --workdir=WORKDIR FLAGS`, as a user types it."""
    run = subprocess.run(
        [sys.executable, "-m", "launch.predict", f"--workdir={workdir}", *flags],
        input=stdin,
        cwd=REPO,
        env=subprocess_env(1),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def _predictions(workdir, split="test"):
    lines = (workdir / f"predictions_{split}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_local_is_a_new_registry_name():
    task = data.get_task("local")
    assert task.labels_from_data and task.kind == "classification"
    others = [t for name, t in data.TASKS.items() if name != "local"]
    assert not any(getattr(t, "labels_from_data", False) for t in others)


def test_default_run_directory_tells_data_sets_apart(tmp_path):
    from pifi_jax.train import default_workdir

    first = default_workdir(_config("m", {"train": str(tmp_path / "a" / "train.csv")}))
    again = default_workdir(_config("m", {"train": str(tmp_path / "a" / "train.csv")}))
    other = default_workdir(_config("m", {"train": str(tmp_path / "b" / "train.csv")}))
    assert first == again != other and first.startswith("runs/local_m_")


@pytest.mark.slow
def test_five_string_classes_train_and_their_names_reach_the_exported_config(
    tiny_bert_dir, tmp_path
):
    labels = ["world", "sports", "business", "tech", "arts"]
    files = _task_files(tmp_path, labels)
    config = _config(tiny_bert_dir, files)
    results = train_and_evaluate(config, tmp_path / "run")
    for key in ("validation/accuracy", "validation/f1_macro", "test/accuracy", "test/f1_macro"):
        assert 0.0 <= results[key] <= 1.0
    saved = json.loads((tmp_path / "run" / "labels.json").read_text())
    assert saved == {"problem_type": "single_label", "label_names": sorted(labels)}
    assert len(_predictions(tmp_path / "run")) == 16
    assert {r["prediction"] for r in _predictions(tmp_path / "run")} <= set(range(5))
    # Test labels are ids in the sorted order.
    assert [r["label"] for r in _predictions(tmp_path / "run")][:5] == [
        sorted(labels).index(label) for label in labels
    ]

    # Predicting needs the run directory only: the training file may be gone.
    Path(files["train"]).rename(tmp_path / "moved.csv")
    run = _launch_predict(
        tmp_path / "run", f"--input={files['test']}", f"--output={tmp_path}/out.csv"
    )
    assert "best (step 2) checkpoint" in run.stderr
    out = pd.read_csv(tmp_path / "out.csv")
    names = sorted(labels)
    assert list(out.columns) == ["text", "label", *(f"p:{n}" for n in names)]
    assert out["text"].tolist() == pd.read_csv(files["test"])["text"].tolist()
    # The labels the best checkpoint's evaluation predicted, by name; probabilities sum to 1.
    assert out["label"].tolist() == [names[r["prediction"]] for r in _predictions(tmp_path / "run")]
    probabilities = out[[f"p:{n}" for n in names]].to_numpy()
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
    assert [names[i] for i in probabilities.argmax(1)] == out["label"].tolist()

    module, params = pifi_jax.from_pretrained(tiny_bert_dir, num_labels=5, log=lambda *_: None)
    out = pifi_jax.save_pretrained(
        module, params, tmp_path / "export", label_names=saved["label_names"]
    )
    hf = json.loads((out / "config.json").read_text())
    assert hf["id2label"] == {str(i): name for i, name in enumerate(sorted(labels))}
    assert hf["label2id"] == {name: i for i, name in enumerate(sorted(labels))}
    import transformers

    assert transformers.AutoConfig.from_pretrained(out).id2label[0] == "arts"
    with pytest.raises(ValueError, match="5 distinct names"):
        pifi_jax.save_pretrained(module, params, tmp_path / "bad", label_names=["a", "b"])


def test_default_names_stay_label_i(tiny_bert_dir, tmp_path):
    module, params = pifi_jax.from_pretrained(tiny_bert_dir, num_labels=3, log=lambda *_: None)
    hf = json.loads(
        (pifi_jax.save_pretrained(module, params, tmp_path) / "config.json").read_text()
    )
    assert hf["id2label"] == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}
    assert "problem_type" not in hf


@pytest.mark.slow
def test_three_integer_classes_train_with_lora(tiny_bert_dir, tmp_path):
    files = _task_files(tmp_path, [3, 1, 2])
    config = _config(tiny_bert_dir, files, "--config.peft.method=lora")
    task = data.task_for_config(config)
    assert (task.num_labels, task.label_names) == (3, ("1", "2", "3"))  # numeric order
    results = train_and_evaluate(config, tmp_path / "run")
    assert 0.0 <= results["test/accuracy"] <= 1.0
    assert results["trainable_params"] < results["total_params"] / 2  # LoRA, not full
    assert (tmp_path / "run" / "adapter").is_dir()
    assert json.loads((tmp_path / "run" / "labels.json").read_text())["label_names"] == [
        "1",
        "2",
        "3",
    ]
    # From the command line: texts on stdin, JSON lines on stdout.
    texts = pd.read_csv(files["test"])["text"].tolist()
    run = _launch_predict(tmp_path / "run", stdin="\n".join(texts) + "\n")
    records = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["text"] for r in records] == texts
    expected = [["1", "2", "3"][r["prediction"]] for r in _predictions(tmp_path / "run")]
    assert [r["label"] for r in records] == expected
    assert all(set(r["probabilities"]) == {"1", "2", "3"} for r in records)


def test_sentence_pairs_train(tiny_bert_dir, tmp_path):
    files = _task_files(tmp_path, ["no", "yes"], header=("premise", "hypothesis", "label"))
    config = _config(tiny_bert_dir, files, "--config.data.text_columns=premise,hypothesis")
    task = data.task_for_config(config)
    assert task.text_columns == ("premise", "hypothesis")
    encoded = data.encode(
        data.load_tokenizer(str(tiny_bert_dir)),
        data.load_examples(task, "train", data_files=files),
        32,
    )
    assert encoded.token_type_ids[0].max() == 1  # the second text is segment 1
    results = train_and_evaluate(config, tmp_path / "run")
    assert {"validation/accuracy", "test/f1_macro"} <= set(results)
    # A jsonl input with the pair's columns (and extra ones, ignored).
    test = pd.read_csv(files["test"])
    test["note"] = "ignored"
    test.to_json(tmp_path / "new.jsonl", orient="records", lines=True)
    _launch_predict(
        tmp_path / "run", f"--input={tmp_path}/new.jsonl", f"--output={tmp_path}/o.jsonl"
    )
    records = [json.loads(line) for line in open(tmp_path / "o.jsonl")]
    assert [(r["premise"], r["hypothesis"]) for r in records] == list(
        zip(test["premise"], test["hypothesis"], strict=True)
    )
    expected = [["no", "yes"][r["prediction"]] for r in _predictions(tmp_path / "run")]
    assert [r["label"] for r in records] == expected


def test_float_labels_are_regression(tiny_bert_dir, tmp_path):
    rng = random.Random(1)
    files = {}
    for split, n in (("train", 40), ("validation", 16), ("test", 16)):
        rows = [[" ".join(rng.choices(FILLER, k=4)), round(rng.uniform(0, 5), 2)] for _ in range(n)]
        rows[0][1] = 2.5  # not all integers
        files[split] = _write_csv(tmp_path / f"{split}.tsv", ("text", "label"), rows, "\t")
    config = _config(tiny_bert_dir, files)
    task = data.task_for_config(config)
    assert (task.problem_type, task.num_labels, task.primary_metric) == ("regression", 1, "pearson")
    results = train_and_evaluate(config, tmp_path / "run")
    assert {"validation/pearson", "validation/spearman", "test/pearson"} <= set(results)
    saved = json.loads((tmp_path / "run" / "labels.json").read_text())
    assert saved == {"problem_type": "regression", "label_names": None}
    records = Predictor.from_workdir(tmp_path / "run").predict_file(files["test"], "-")
    expected = [r["prediction"] for r in _predictions(tmp_path / "run")]
    np.testing.assert_allclose([r["score"] for r in records], expected, rtol=1e-5, atol=1e-6)


def test_integer_floats_stay_classes_and_regression_can_be_asked_for(tmp_path):
    files = {"train": _write_csv(tmp_path / "t.csv", ("text", "label"), [["a", 1.0], ["b", 0]])}
    task = data.resolve_task(data.get_task("local"), data_files=files)
    assert (task.problem_type, task.label_names) == ("single_label", ("0", "1"))
    task = data.resolve_task(data.get_task("local"), data_files=files, problem_type="regression")
    assert task.is_regression


def test_label_order_is_numeric_for_integers_and_sorted_for_strings(tmp_path):
    def names(values):
        rows = [[f"t{i}", v] for i, v in enumerate(values)]
        files = {"train": _write_csv(tmp_path / "t.csv", ("text", "label"), rows)}
        return data.resolve_task(data.get_task("local"), data_files=files).label_names

    assert names([10, 2, -1, 2]) == ("-1", "2", "10")
    assert names(["b", "a", "c", "a"]) == ("a", "b", "c")
    assert names(["b", "a1", "10a"]) == ("10a", "a1", "b")
    # numbers among names are refused (a typo, or two label schemes in one column)
    with pytest.raises(ValueError, match=r"mixes numbers \(row 1: '01'\) and names \(row 0: 'b'\)"):
        names(["b", "01", "1"])


def test_an_unseen_validation_label_is_refused_with_file_column_row_and_value(tmp_path):
    rows = _rows(random.Random(0), ["sports", "arts"], 6)
    bad = _write_csv(tmp_path / "dev.csv", ("text", "topic"), [["good", "sports"], ["a", "world"]])
    files = {
        "train": _write_csv(tmp_path / "train.csv", ("text", "topic"), rows),
        "validation": bad,
    }
    task = data.resolve_task(data.get_task("local"), data_files=files, label_column="topic")
    with pytest.raises(ValueError) as error:
        data.load_examples(task, "validation", data_files=files)
    message = str(error.value)
    for part in (bad, "column 'topic'", "row 1", "'world'", "not a label of the training split"):
        assert part in message


def test_missing_labels_are_refused(tmp_path):
    rows = [["good", "a"], ["bad", "b"], ["dull", ""]]
    files = {"train": _write_csv(tmp_path / "train.csv", ("text", "label"), rows[:2])}
    files["test"] = _write_csv(tmp_path / "test.csv", ("text", "label"), rows)
    task = data.resolve_task(data.get_task("local"), data_files=files)
    with pytest.raises(ValueError, match=r"test\.csv: column 'label' row 2: missing label"):
        data.load_examples(task, "test", data_files=files)
    files["train"] = files["test"]
    with pytest.raises(ValueError, match=r"test\.csv: column 'label' row 2: missing label"):
        data.resolve_task(data.get_task("local"), data_files=files)


def test_misconfigurations_are_refused(tmp_path):
    local = data.get_task("local")
    with pytest.raises(ValueError, match="data_files.train"):
        data.resolve_task(local, data_files={})
    files = {"train": _write_csv(tmp_path / "t.csv", ("text", "label"), [["a", "x"], ["b", "x"]])}
    with pytest.raises(ValueError, match="1 distinct label"):
        data.resolve_task(local, data_files=files)
    with pytest.raises(ValueError, match="missing column 'sentence'"):
        data.resolve_task(local, data_files=files, text_columns=("sentence",))
    with pytest.raises(ValueError, match="problem_type"):
        data.resolve_task(local, data_files=files, problem_type="ordinal")
    lists = tmp_path / "t.jsonl"
    lists.write_text('{"text": "a", "label": ["x"]}\n{"text": "b", "label": ["y"]}\n')
    for problem_type in ("auto", "single_label"):
        with pytest.raises(ValueError, match=r"t\.jsonl: column 'label' row 0: .*multi_label"):
            data.resolve_task(local, data_files={"train": str(lists)}, problem_type=problem_type)


def _multi_label_files(tmp_path):
    rng = random.Random(2)
    names = ["arts", "sports", "tech"]
    files = {}
    for split, n in (("train", 40), ("validation", 16), ("test", 16)):
        with open(tmp_path / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for i in range(n):
                chosen = [name for j, name in enumerate(names) if (i >> j) & 1]
                words = rng.choices(FILLER, k=3) + [CUES[names.index(c)] for c in chosen]
                f.write(json.dumps({"text": " ".join(words), "label": chosen}) + "\n")
        files[split] = str(tmp_path / f"{split}.jsonl")
    return files


def test_multi_label_lists_train_with_sigmoid_bce_and_f1(tiny_bert_dir, tmp_path):
    files = _multi_label_files(tmp_path)
    config = _config(tiny_bert_dir, files, "--config.data.problem_type=multi_label")
    task = data.task_for_config(config)
    assert (task.num_labels, task.label_names) == (3, ("arts", "sports", "tech"))
    examples = data.load_examples(task, "train", data_files=files)
    assert examples.labels.shape == (40, 3)
    np.testing.assert_array_equal(examples.labels[:4], [[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]])
    results = train_and_evaluate(config, tmp_path / "run")
    assert {"validation/f1_micro", "validation/f1_macro", "test/f1_micro"} <= set(results)
    saved = json.loads((tmp_path / "run" / "labels.json").read_text())
    assert saved == {"problem_type": "multi_label", "label_names": ["arts", "sports", "tech"]}
    record = _predictions(tmp_path / "run")[3]
    assert record["label"] == [0, 1] and set(record["prediction"]) <= {0, 1, 2}
    records = Predictor.from_workdir(tmp_path / "run").predict_file(
        files["test"], tmp_path / "out.tsv"
    )
    names = ["arts", "sports", "tech"]
    for mine, theirs in zip(records, _predictions(tmp_path / "run"), strict=True):
        assert mine["labels"] == [names[i] for i in theirs["prediction"]]
        assert mine["labels"] == [n for n in names if mine["probabilities"][n] > 0.5]
    written = pd.read_csv(tmp_path / "out.tsv", sep="\t", keep_default_na=False)
    assert written["labels"].tolist() == [",".join(r["labels"]) for r in records]

    module, params = pifi_jax.from_pretrained(tiny_bert_dir, num_labels=3, log=lambda *_: None)
    out = pifi_jax.save_pretrained(
        module,
        params,
        tmp_path / "export",
        label_names=task.label_names,
        problem_type="multi_label",
    )
    hf = json.loads((out / "config.json").read_text())
    assert hf["problem_type"] == "multi_label_classification"
    assert hf["id2label"]["2"] == "tech"


def test_comma_separated_multi_labels_and_unseen_ones(tmp_path):
    rows = [["good", "b, a"], ["bad", "a"], ["dull", "b,"]]
    files = {"train": _write_csv(tmp_path / "train.csv", ("text", "label"), rows)}
    files["test"] = _write_csv(tmp_path / "test.csv", ("text", "label"), [["x", "a,z"]])
    local = data.get_task("local")
    task = data.resolve_task(local, data_files=files, problem_type="multi_label")
    assert task.label_names == ("a", "b")
    labels = data.load_examples(task, "train", data_files=files).labels
    np.testing.assert_array_equal(labels, [[1, 1], [1, 0], [0, 1]])
    with pytest.raises(ValueError, match=r"test\.csv: column 'label' row 0: label 'z' is not"):
        data.load_examples(task, "test", data_files=files)
    # An empty csv field is a missing label, refused (no labels at all: [] in a jsonl file).
    _write_csv(tmp_path / "test.csv", ("text", "label"), [["x", "a"], ["y", ""]])
    with pytest.raises(ValueError, match=r"test\.csv: column 'label' row 1: missing label"):
        data.load_examples(task, "test", data_files=files)
    # Not asked for: the same strings are single-label classes.
    assert data.resolve_task(local, data_files=files).label_names == ("a", "b,", "b, a")


def test_multi_label_objective_matches_bce_and_sklearn():
    from sklearn.metrics import f1_score

    class Logits:  # a stand-in module: the logits are the batch's input_ids, as floats
        def apply(self, variables, input_ids, **kw):
            import jax.numpy as jnp

            return jnp.asarray(input_ids, jnp.float32)

    objective = objectives.MultiLabel(Logits(), 3)
    logits = np.array([[2.0, -1.0, -0.5], [-3.0, 1.0, 0.0], [1.0, 1.0, 1.0]], np.float32)
    labels = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]], np.float32)
    weights = np.array([1.0, 1.0, 0.0], np.float32)
    batch = {"input_ids": logits, "labels": labels, "weights": weights}
    loss, aux = objective.loss_fn({}, {}, batch, None)
    probs = 1 / (1 + np.exp(-logits[:2]))
    bce = -(labels[:2] * np.log(probs) + (1 - labels[:2]) * np.log(1 - probs))
    np.testing.assert_allclose(float(loss), bce.mean(), rtol=1e-5)
    assert float(aux["weight"]) == 2.0 and float(aux["exact_match"]) == 1.0
    outputs = {k: np.asarray(v) for k, v in objective.predict({}, batch).items()}
    expected = [[1, 0, 0], [0, 1, 0]]  # sigmoid(0) = 0.5 is not above the threshold
    np.testing.assert_array_equal(outputs["predictions"][:2], expected)
    scores = objective.score(outputs)
    assert scores["f1_micro"] == pytest.approx(f1_score(labels[:2], expected, average="micro"))
    assert scores["f1_macro"] == pytest.approx(f1_score(labels[:2], expected, average="macro"))
    assert objectives.objective_class("multi_label", None) is objectives.MultiLabel
