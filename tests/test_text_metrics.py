"""Generation metrics against rouge-score's and sacrebleu's own results on fixed texts."""

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from pifi_jax.train.text_metrics import KNOWN_METRICS, generation_metrics, split_sentences

# Stemming-sensitive words, multi-sentence texts for rougeLsum (the last one with its sentences
# in the other order) and an empty prediction.
PREDICTIONS = [
    "The dog runs in the park. It was running fast!",
    "Stocks fell sharply on Monday. Investors are worried about rates? Analysts disagree.",
    "",
    "a cat sat on the mat",
    "The committee approved the new budget for schools",
    "Rain is expected tomorrow. The sun shone all day.",
]
REFERENCES = [
    "A dog is running in the park. It ran quickly.",
    "Stock markets fell on Monday as investors worried about interest rates. Analysts agreed.",
    "The meeting was postponed until next week.",
    "the cat sat on the mat",
    "The new school budget was approved by the committee. Teachers welcomed it.",
    "The sun shone all day. Rain is expected tomorrow.",
]
# The same texts with one sentence per line, written out by hand.
PREDICTIONS_BY_LINE = [
    "The dog runs in the park.\nIt was running fast!",
    "Stocks fell sharply on Monday.\nInvestors are worried about rates?\nAnalysts disagree.",
    "",
    "a cat sat on the mat",
    "The committee approved the new budget for schools",
    "Rain is expected tomorrow.\nThe sun shone all day.",
]
REFERENCES_BY_LINE = [
    "A dog is running in the park.\nIt ran quickly.",
    "Stock markets fell on Monday as investors worried about interest rates.\nAnalysts agreed.",
    "The meeting was postponed until next week.",
    "the cat sat on the mat",
    "The new school budget was approved by the committee.\nTeachers welcomed it.",
    "The sun shone all day.\nRain is expected tomorrow.",
]


def _rouge_reference(rouge_type, predictions, references):
    scorer = rouge_scorer.RougeScorer([rouge_type], use_stemmer=True)
    pairs = zip(predictions, references, strict=True)
    return 100.0 * np.mean([scorer.score(ref, pred)[rouge_type].fmeasure for pred, ref in pairs])


def test_sentence_split_matches_the_hand_split():
    assert [split_sentences(text) for text in PREDICTIONS] == PREDICTIONS_BY_LINE
    assert [split_sentences(text) for text in REFERENCES] == REFERENCES_BY_LINE
    assert split_sentences(" One.  Two\n\nthree ") == "One.\nTwo\nthree"


def test_rouge_bleu_chrf_equal_the_packages_own_scores():
    names = [m for m in KNOWN_METRICS if m not in ("exact_match", "answer_accuracy")]  # own tests
    got = generation_metrics(PREDICTIONS, REFERENCES, names=names)
    assert list(got) == names
    for rouge_type in ("rouge1", "rouge2", "rougeL"):
        assert got[rouge_type] == pytest.approx(
            _rouge_reference(rouge_type, PREDICTIONS, REFERENCES), abs=1e-9
        )
    assert got["rougeLsum"] == pytest.approx(
        _rouge_reference("rougeLsum", PREDICTIONS_BY_LINE, REFERENCES_BY_LINE), abs=1e-9
    )
    assert got["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score, abs=1e-9
    )
    assert got["chrf"] == pytest.approx(
        sacrebleu.corpus_chrf(PREDICTIONS, [REFERENCES]).score, abs=1e-9
    )
    for value in got.values():
        assert 0.0 < value < 100.0


def test_sentence_lines_change_rouge_lsum_only():
    # Without the split rougeLsum sees one sentence per text and equals rougeL; with it, sentences
    # in another order still match as a whole (the last example).
    got = generation_metrics(PREDICTIONS, REFERENCES)
    unsplit_lsum = _rouge_reference("rougeLsum", PREDICTIONS, REFERENCES)
    assert unsplit_lsum == pytest.approx(got["rougeL"], abs=1e-9)
    assert got["rougeLsum"] != pytest.approx(got["rougeL"], abs=1e-3)


def test_stemming_counts_inflections_as_matches():
    got = generation_metrics(["he runs"], ["he running"], names=("rouge1",))
    assert got == {"rouge1": pytest.approx(100.0)}


def test_default_names_and_exact_and_empty_predictions():
    perfect = generation_metrics(REFERENCES, REFERENCES)
    assert list(perfect) == ["rouge1", "rouge2", "rougeL", "rougeLsum", "bleu"]
    for value in perfect.values():
        assert value == pytest.approx(100.0)
    empty = generation_metrics([""] * len(REFERENCES), REFERENCES)
    assert all(value == 0.0 for value in empty.values())


def test_refusals():
    with pytest.raises(ValueError, match=r"unknown metrics \['meteor'\].*rougeLsum.*chrf"):
        generation_metrics(["a"], ["a"], names=("rouge1", "meteor"))
    with pytest.raises(ValueError, match="3 predictions but 2 references"):
        generation_metrics(["a", "b", "c"], ["a", "b"])
    with pytest.raises(ValueError, match="no predictions"):
        generation_metrics([], [])
    with pytest.raises(TypeError, match=r"predictions\[1\] is list"):
        generation_metrics(["a", [1, 2]], ["a", "b"])


def test_exact_match_ignores_case_and_spacing_only():
    got = generation_metrics(
        ["True", " solution2 ", "answer 1", "false"],
        ["true", "solution2", "answer1", "true"],
        ["exact_match"],
    )
    assert got == {"exact_match": 50.0}


def test_answer_accuracy_takes_the_first_answer_word_of_each_prediction():
    """LLM-Adapters' scoring: right when the first answer word found is the reference, however
    the generation goes on; exact match on the same texts for contrast."""
    predictions = [
        "true/false\nTo determine if",  # answers, then talks: right
        "False, not true",  # the first word counts: right
        "it is untrue",  # no whole answer word: wrong
        "option10 or option1",  # whole words: option10 is skipped, option1 found: right
        "TRUE",
    ]
    references = ["true", "false", "true", "option1", "false"]
    answers = ("true", "false", "option1")
    scores = generation_metrics(
        predictions, references, ("exact_match", "answer_accuracy"), answers
    )
    assert scores["answer_accuracy"] == pytest.approx(100 * 3 / 5)
    assert scores["exact_match"] == 0.0
    with pytest.raises(ValueError, match="answer_accuracy needs the task's answer words"):
        generation_metrics(predictions, references, ("answer_accuracy",))
