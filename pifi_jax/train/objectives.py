"""Objectives: what a task is to the trainer, apart from how its model is built.

An objective says
- which batch layout it reads (`layout`: what `pifi_jax.data.Batcher` assembles),
- its loss `loss_fn(trainable, frozen, batch, rng, deterministic=False) -> (loss, aux)` (dropout
  on unless `deterministic`, which a method's probe of the model asks for): the mean loss of the batch
  and `aux`, a dict of sums over the batch that always holds "weight" (rows or target tokens
  counted) and may hold more (e.g. "accuracy": the number of correct rows); the train step
  accumulates micro-batches by these sums and reports every other sum divided by "weight",
- what a prediction is (`predict(params, batch) -> dict of per-row arrays`, traced inside the
  evaluation jit: argmax class ids with the class probabilities, regression scores, generated
  token ids),
- the host-side metrics over a whole evaluation split (`score(outputs, split) -> {name: value}`)
  and its per-example records (`records(outputs, split)`: what predictions files hold).

The loop, checkpoints, sweeps and the experiment runner call these without knowing which
objective runs. `make_objective(config, task, module, tokenizer)` picks one from the task and the
model (`config.objective`, "auto" by default); `objective_class(...)` tells a model builder which
head to build (`model_task`: "classification", "causal_lm" or "seq2seq") before the module exists.

    classification  cross-entropy (label smoothing as PyTorch's), argmax, accuracy / F1 / MCC
    regression      mean squared error on a 1-output head, Pearson / Spearman
    multi_label     sigmoid + binary cross-entropy per label, labels [batch, K] 0/1; a label
                    is predicted where its sigmoid is > 0.5; micro / macro F1 (scikit-learn)
    causal_lm       prompt + target (+ eos) in one sequence, next-token loss on the target
                    tokens only (`loss_mask`: prompt and padding 0); evaluation generates after
                    the prompt and scores the text (ROUGE, BLEU)
    seq2seq         encoder-decoder: source -> encoder, target shifted right behind the model's
                    decoder start token -> decoder, loss on the target tokens (padding ignored);
                    evaluation generates from the source and scores the text
    extractive_qa   start/end logits over each (question, context window); cross-entropy on the
                    answer's first and last token; evaluation picks each example's best span
                    over its windows and gives SQuAD exact match / F1
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pifi_jax.train.metrics import (
    compute_metrics,
    cross_entropy_loss,
    mse_loss,
    next_token_loss,
    token_cross_entropy,
)
from pifi_jax.train.partition import merge_params

CLASSIFIER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
GENERATION_METHODS = ("greedy", "beam")


def _safe_mean(total: jax.Array, count: jax.Array) -> jax.Array:
    return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)


@dataclasses.dataclass(frozen=True)
class Classification:
    """Sequence classification: logits [batch, num_labels] from the classifier inputs."""

    name: ClassVar[str] = "classification"
    model_task: ClassVar[str] = "classification"
    layout: ClassVar[str] = "classification"
    module: Any
    num_labels: int
    metrics: tuple[str, ...] = ("accuracy",)
    label_smoothing: float = 0.0

    def _logits(self, params, batch, **kw):
        inputs = {k: batch[k] for k in CLASSIFIER_INPUTS if k in batch}
        return self.module.apply({"params": params}, **inputs, **kw)

    def loss_fn(self, trainable, frozen, batch, rng, deterministic: bool = False):
        params = merge_params(trainable, frozen)
        logits = self._logits(params, batch, deterministic=deterministic, rngs={"dropout": rng})
        weights = batch["weights"]
        labels = batch["labels"].astype(jnp.int32)
        loss = cross_entropy_loss(logits, labels, weights, self.label_smoothing, self.num_labels)
        correct = jnp.sum((jnp.argmax(logits, -1) == labels) * weights)
        return loss, {"weight": jnp.sum(weights), "accuracy": correct}

    def predict(self, params, batch):
        logits = self._logits(params, batch, deterministic=True)
        return {
            "predictions": jnp.argmax(logits, -1),
            "probabilities": jax.nn.softmax(logits.astype(jnp.float32), -1),  # [batch, K]
            "labels": batch["labels"],
            "weights": batch["weights"],
        }

    def score(self, outputs: dict, split=None) -> dict[str, float]:
        return compute_metrics(
            self.metrics, outputs["predictions"], outputs["labels"], outputs["weights"]
        )

    def records(self, outputs: dict, split=None) -> list[dict]:
        """One {"index", "prediction", "label"} per real row, for predictions files."""
        keep = np.asarray(outputs["weights"]) != 0
        return [
            {"index": int(i), "prediction": p.item(), "label": y.item()}
            for i, p, y in zip(
                np.flatnonzero(keep),
                np.asarray(outputs["predictions"])[keep],
                np.asarray(outputs["labels"])[keep],
                strict=True,
            )
        ]


@dataclasses.dataclass(frozen=True)
class Regression(Classification):
    """A one-output head trained with mean squared error (e.g. STS-B similarity scores)."""

    name: ClassVar[str] = "regression"
    num_labels: int = 1
    metrics: tuple[str, ...] = ("pearson",)

    def loss_fn(self, trainable, frozen, batch, rng, deterministic: bool = False):
        params = merge_params(trainable, frozen)
        logits = self._logits(params, batch, deterministic=deterministic, rngs={"dropout": rng})
        loss = mse_loss(logits[:, 0], batch["labels"], batch["weights"])
        return loss, {"weight": jnp.sum(batch["weights"])}

    def predict(self, params, batch):
        logits = self._logits(params, batch, deterministic=True)
        return {"predictions": logits[:, 0], "labels": batch["labels"], "weights": batch["weights"]}


@dataclasses.dataclass(frozen=True)
class MultiLabel(Classification):
    """Multi-label classification: K independent sigmoids over logits [batch, K], trained with
    binary cross-entropy (the mean over the K labels of a row, then the weighted mean over rows,
    as PyTorch's BCEWithLogitsLoss); labels [batch, K] are 0/1 indicators."""

    name: ClassVar[str] = "multi_label"
    metrics: tuple[str, ...] = ("f1_micro", "f1_macro")
    threshold: float = 0.5

    def loss_fn(self, trainable, frozen, batch, rng, deterministic: bool = False):
        params = merge_params(trainable, frozen)
        logits = self._logits(params, batch, deterministic=deterministic, rngs={"dropout": rng})
        logits = logits.astype(jnp.float32)  # [batch, K]
        labels = batch["labels"].astype(jnp.float32)  # [batch, K]
        weights = batch["weights"].astype(jnp.float32)  # [batch]
        per_row = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels), axis=-1)
        total = jnp.sum(weights)
        loss = _safe_mean(jnp.sum(per_row * weights), total)
        exact = jnp.all((jax.nn.sigmoid(logits) > self.threshold) == (labels > 0.5), axis=-1)
        return loss, {"weight": total, "exact_match": jnp.sum(exact * weights)}

    def predict(self, params, batch):
        logits = self._logits(params, batch, deterministic=True)
        probabilities = jax.nn.sigmoid(logits.astype(jnp.float32))  # [batch, K]
        return {
            "predictions": (probabilities > self.threshold).astype(jnp.int32),  # [batch, K]
            "probabilities": probabilities,
            "labels": batch["labels"],
            "weights": batch["weights"],
        }

    def _rows(self, outputs: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        keep = np.asarray(outputs["weights"]) != 0
        predictions = np.asarray(outputs["predictions"])[keep].astype(np.int32)
        labels = (np.asarray(outputs["labels"])[keep] > 0.5).astype(np.int32)
        return np.flatnonzero(keep), predictions, labels

    def score(self, outputs: dict, split=None) -> dict[str, float]:
        from sklearn.metrics import f1_score  # noqa: PLC0415 (only multi-label runs need it)

        _, predictions, labels = self._rows(outputs)
        if not len(labels):
            raise ValueError("No rows with nonzero weight to compute metrics on.")
        averages = {"f1_micro": "micro", "f1_macro": "macro"}
        unknown = [m for m in self.metrics if m not in averages]
        if unknown:
            raise ValueError(f"multi-label metrics {unknown} are not among {sorted(averages)}")
        return {
            name: float(f1_score(labels, predictions, average=averages[name], zero_division=0))
            for name in self.metrics
        }

    def records(self, outputs: dict, split=None) -> list[dict]:
        """One {"index", "prediction", "label"} per real row: the ids of the labels predicted
        and of the true labels."""
        index, predictions, labels = self._rows(outputs)
        return [
            {
                "index": int(i),
                "prediction": np.flatnonzero(p).tolist(),
                "label": np.flatnonzero(y).tolist(),
            }
            for i, p, y in zip(index, predictions, labels, strict=True)
        ]


@dataclasses.dataclass(frozen=True)
class Generation:
    """What the two generative objectives share: decoding options and text metrics.

    tokenizer: decodes the generated ids on the host; metrics: names of
    pifi_jax.train.text_metrics (rouge1, rouge2, rougeL, rougeLsum, bleu, chrf).
    """

    module: Any
    tokenizer: Any
    metrics: tuple[str, ...] = ("rouge1", "rouge2", "rougeL", "bleu")
    max_new_tokens: int = 32
    method: str = "greedy"
    num_beams: int = 4
    length_penalty: float = 1.0
    answers: tuple[str, ...] = ()  # the task's answer words (metric answer_accuracy)

    def __post_init__(self):
        if self.method not in GENERATION_METHODS:
            raise ValueError(
                f"generation.method {self.method!r} is not one of {GENERATION_METHODS}"
            )
        if self.max_new_tokens < 1:
            raise ValueError(f"generation.max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Where generation stops: the model config's eos ids and the tokenizer's (the token
        the targets were closed with, see data.encode_generation)."""
        eos = self.module.config.eos_token_id
        ids = [] if eos is None else [int(e) for e in np.atleast_1d(eos)]
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.append(int(self.tokenizer.eos_token_id))
        return tuple(dict.fromkeys(ids))

    def _generate(self, params, input_ids, attention_mask):
        from pifi_jax.generate import generate  # noqa: PLC0415 (generate imports models)

        return generate(
            self.module,
            params,
            input_ids,
            attention_mask,
            max_new_tokens=self.max_new_tokens,
            method=self.method,
            eos_token_id=self.eos_ids,
            num_beams=self.num_beams,
            length_penalty=self.length_penalty,
        )

    def predict(self, params, batch):
        tokens = self._generate(params, batch["input_ids"], batch["attention_mask"])
        return {"tokens": tokens, "index": batch["index"], "weights": batch["weights"]}

    def decode(self, tokens: np.ndarray) -> list[str]:
        """Generated ids [rows, new] -> texts, each cut at its first eos."""
        eos = set(self.eos_ids)
        texts = []
        for row in np.asarray(tokens):
            cut = next((i for i, t in enumerate(row) if int(t) in eos), len(row))
            texts.append(self.tokenizer.decode(row[:cut].tolist(), skip_special_tokens=True))
        return [t.strip() for t in texts]

    def _texts(self, outputs: dict, split) -> tuple[np.ndarray, list[str], list[str]]:
        keep = np.asarray(outputs["weights"]) != 0
        index = np.asarray(outputs["index"])[keep]
        predictions = self.decode(np.asarray(outputs["tokens"])[keep])
        return index, predictions, [split.references[i] for i in index]

    def score(self, outputs: dict, split) -> dict[str, float]:
        from pifi_jax.train.text_metrics import generation_metrics  # noqa: PLC0415

        _, predictions, references = self._texts(outputs, split)
        return generation_metrics(predictions, references, self.metrics, self.answers)

    def records(self, outputs: dict, split) -> list[dict]:
        """One {"index", "prediction", "reference"} per example, for predictions files."""
        index, predictions, references = self._texts(outputs, split)
        return [
            {"index": int(i), "prediction": p, "reference": r}
            for i, p, r in zip(index, predictions, references, strict=True)
        ]


@dataclasses.dataclass(frozen=True)
class CausalLM(Generation):
    """Decoder-only fine-tuning on prompt + target (+ eos), loss on the target tokens only.

    Training batches: input_ids / attention_mask [batch, length] (right-padded) and loss_mask
    [batch, length], 1 on the target tokens. Position t predicts token t + 1, so a target token
    is learnt from everything before it; prompt tokens are inputs only, their own predictions
    are never counted. Under prompt tuning the model's P soft-token slots in front are dropped.
    Evaluation batches hold the prompts alone, left-padded, and generate after them.
    """

    name: ClassVar[str] = "causal_lm"
    model_task: ClassVar[str] = "causal_lm"
    layout: ClassVar[str] = "causal_lm"

    def loss_fn(self, trainable, frozen, batch, rng, deterministic: bool = False):
        params = merge_params(trainable, frozen)
        ids = batch["input_ids"]
        logits = self.module.apply(
            {"params": params},
            ids,
            batch["attention_mask"],
            deterministic=deterministic,
            rngs={"dropout": rng},
        )
        logits = logits[:, -ids.shape[1] :]  # [batch, length, vocab] (soft-prompt slots dropped)
        total, count = next_token_loss(logits, ids, batch["loss_mask"])
        return _safe_mean(total, count), {"weight": count}


@dataclasses.dataclass(frozen=True)
class Seq2Seq(Generation):
    """Encoder-decoder fine-tuning: source -> encoder; decoder inputs are the target shifted
    right behind `decoder_start_token_id`; loss on every real target token (padding ignored).

    Training batches: input_ids / attention_mask [batch, source] and target_ids / target_mask
    [batch, target] (the tokenizer's target tokens, its eos included). Evaluation batches hold
    the sources and generate from the decoder start token.
    """

    name: ClassVar[str] = "seq2seq"
    model_task: ClassVar[str] = "seq2seq"
    layout: ClassVar[str] = "seq2seq"

    def decoder_inputs(self, target_ids: jax.Array) -> jax.Array:
        start = self.module.config.decoder_start_token_id
        front = jnp.full((target_ids.shape[0], 1), start, target_ids.dtype)
        return jnp.concatenate([front, target_ids[:, :-1]], axis=1)  # [batch, target]

    def loss_fn(self, trainable, frozen, batch, rng, deterministic: bool = False):
        params = merge_params(trainable, frozen)
        targets, mask = batch["target_ids"], batch["target_mask"]
        logits = self.module.apply(
            {"params": params},
            batch["input_ids"],
            batch["attention_mask"],
            self.decoder_inputs(targets),
            mask,
            deterministic=deterministic,
            rngs={"dropout": rng},
        )  # [batch, target, vocab]
        total, count = token_cross_entropy(logits, targets, mask)
        return _safe_mean(total, count), {"weight": count}


@dataclasses.dataclass(frozen=True)
class ExtractiveQA:
    """Span extraction (SQuAD): start and end logits over each window's tokens.

    Batches are windows (data.spans, layout "span"); the loss is the mean of the start and end
    cross-entropies over the real tokens, as transformers' `*ForQuestionAnswering` computes it
    (a window without its answer is taught to point at token 0). Prediction keeps both logits,
    padded to `max_length` (the largest bucket) so that every batch's rows concatenate; scoring picks each example's
    best span over its windows on the host (train.qa.best_answers) and gives SQuAD's exact match
    and F1 (train.qa.squad_scores), in 0..100.
    """

    name: ClassVar[str] = "extractive_qa"
    model_task: ClassVar[str] = "question_answering"
    layout: ClassVar[str] = "span"
    module: Any
    max_length: int
    metrics: tuple[str, ...] = ("exact_match", "f1")
    n_best: int = 20
    max_answer_tokens: int = 30

    def _logits(self, params, batch, **kw):
        inputs = {k: batch[k] for k in CLASSIFIER_INPUTS if k in batch}
        start, end = self.module.apply({"params": params}, **inputs, **kw)
        real = batch["attention_mask"] > 0
        length = real.shape[1]  # prompt tuning puts its soft tokens in front: dropped
        start, end = start[:, -length:], end[:, -length:]
        low = jnp.finfo(jnp.float32).min
        return jnp.where(real, start, low), jnp.where(real, end, low)  # [b, L] each

    def loss_fn(self, trainable, frozen, batch, rng, deterministic: bool = False):
        params = merge_params(trainable, frozen)
        start, end = self._logits(params, batch, deterministic=deterministic, rngs={"dropout": rng})
        weights = batch["weights"]
        losses = (
            optax.softmax_cross_entropy_with_integer_labels(start, batch["start_positions"])
            + optax.softmax_cross_entropy_with_integer_labels(end, batch["end_positions"])
        ) / 2
        total = jnp.sum(weights)
        hit = (jnp.argmax(start, -1) == batch["start_positions"]) & (
            jnp.argmax(end, -1) == batch["end_positions"]
        )
        return _safe_mean(jnp.sum(losses * weights), total), {
            "weight": total,
            "span_accuracy": jnp.sum(hit * weights),
        }

    def predict(self, params, batch):
        start, end = self._logits(params, batch, deterministic=True)
        pad = ((0, 0), (0, self.max_length - start.shape[1]))
        low = jnp.finfo(jnp.float32).min
        return {
            "start_logits": jnp.pad(start, pad, constant_values=low),  # [b, max_length]
            "end_logits": jnp.pad(end, pad, constant_values=low),
            "index": batch["index"],
            "weights": batch["weights"],
        }

    def answers(self, outputs: dict, split) -> list[str]:
        """Each example's predicted answer text (see train.qa)."""
        from pifi_jax.train import qa  # noqa: PLC0415

        keep = np.asarray(outputs["weights"]) != 0
        index = np.asarray(outputs["index"])[keep]
        order = np.argsort(index)
        starts = np.asarray(outputs["start_logits"])[keep][order]
        ends = np.asarray(outputs["end_logits"])[keep][order]
        windows = index[order]
        return qa.best_answers(
            starts,
            ends,
            [split.offsets[w] for w in windows],
            split.window_example[windows],
            split.contexts,
            self.n_best,
            self.max_answer_tokens,
        )

    def score(self, outputs: dict, split) -> dict[str, float]:
        from pifi_jax.train import qa  # noqa: PLC0415

        scores = qa.squad_scores(self.answers(outputs, split), split.answers)
        return {name: scores[name] for name in self.metrics}

    def records(self, outputs: dict, split) -> list[dict]:
        """One {"index", "prediction", "answers"} per example, for predictions files."""
        return [
            {"index": i, "prediction": p, "answers": list(a)}
            for i, (p, a) in enumerate(
                zip(self.answers(outputs, split), split.answers, strict=True)
            )
        ]


OBJECTIVES = {
    cls.name: cls
    for cls in (Classification, Regression, MultiLabel, CausalLM, Seq2Seq, ExtractiveQA)
}


def objective_class(name: str, task, model_config: dict | None = None) -> type:
    """The objective `name` names, or for "auto" the one the task and model call for: a
    classification task -> classification (regression with one label, multi_label for a task of
    problem_type "multi_label"); a generation task ->
    seq2seq for an encoder-decoder (the Hugging Face config's `is_encoder_decoder`), else
    causal_lm."""
    if name != "auto":
        if name not in OBJECTIVES:
            raise ValueError(f"objective {name!r} is not one of {['auto', *sorted(OBJECTIVES)]}")
        return OBJECTIVES[name]
    if task.kind == "generation":
        encoder_decoder = bool((model_config or {}).get("is_encoder_decoder", False))
        return Seq2Seq if encoder_decoder else CausalLM
    if task.kind == "extractive_qa":
        return ExtractiveQA
    if getattr(task, "problem_type", None) == "multi_label":
        return MultiLabel
    return Regression if task.num_labels == 1 else Classification


def make_objective(config, task, module, tokenizer=None, model_config: dict | None = None):
    """The objective of a run config (`config.objective`, the task's metrics, `config.generation`
    for generative tasks) over the built module."""
    cls = objective_class(config.get("objective", "auto"), task, model_config)
    smoothing = config.train.label_smoothing
    if issubclass(cls, Generation):
        if smoothing:
            raise ValueError(
                "train.label_smoothing applies to classification; set it to 0 for "
                f"the {cls.name} objective"
            )
        gc = config.generation
        return cls(
            module,
            tokenizer,
            metrics=tuple(task.metrics),
            max_new_tokens=gc.max_new_tokens,
            method=gc.method,
            num_beams=gc.num_beams,
            length_penalty=gc.length_penalty,
            answers=tuple(getattr(task, "answers", ())),
        )
    if cls is ExtractiveQA:
        if task.kind != "extractive_qa":
            raise ValueError(
                f"objective 'extractive_qa' needs an extractive QA task (squad_v1, squad_spans, "
                f"qa_local), not task {task.name!r} ({task.kind})"
            )
        if smoothing:
            raise ValueError("train.label_smoothing applies to classification; set it to 0")
        return ExtractiveQA(
            module,
            max(config.data.buckets),
            tuple(task.metrics),
            n_best=config.data.n_best,
            max_answer_tokens=config.data.max_answer_tokens,
        )
    if cls is Regression:
        return Regression(module, metrics=tuple(task.metrics))
    if cls is MultiLabel:
        if smoothing:
            raise ValueError("train.label_smoothing applies to single-label classification")
        return MultiLabel(module, task.num_labels, tuple(task.metrics))
    return cls(module, task.num_labels, tuple(task.metrics), smoothing)
