"""Choosing the LLM layer to plug in from the task's data (the label-aware "ILM" variant; pifi.md).

    scores = select_layer("asset:smollm2", texts, labels)    # SelectionConfig() defaults
    print(scores.table()); scores.write_csv("scores.csv"); scores.plot("scores.png")
    layer = scores.chosen

1. n labelled examples (`samples`, default 400) go once through the whole LLM, causally, as in
   pretraining. Only one layer's weights are loaded at a time (`pifi_jax.load_layer` per index, the
   embeddings from the model's embedding tensor alone), so a 7-9B model fits one accelerator and a
   small one a CPU. Each layer's output is mean-pooled over the attention mask: X_l [n, d]. (The
   output of layer l is the residual stream right after it; the final norm is not applied.)
2. The examples are split once (stratified, `holdout` of them held out). On the fitting part,
   per layer: PCA with `pcs` components; each component's score is |Pearson r| with the label
   (multiclass: the largest over one-vs-rest indicators).
3. The `top_pcs` best components give R_l, the part of X_l they explain, and the counterfactual
   X_l - lambda R_l for each lambda in `lambdas` (0.5, 1).
4. A logistic-regression probe is fitted on X_l (fitting part) and scored on the held-out part, on
   X_l and on each counterfactual: effect_l = max over lambda of max(0, acc(X_l) - acc(X_l - lambda
   R_l)). (The fork this comes from scored on the fitting data, which a probe with d >> n fits
   perfectly.)
5. method "effect" (default) picks the argmax of effect_l (ties: the larger correlation score);
   method "corr", the cheap option, picks the argmax of the mean of the top |r| (no probe at all).

The probe is multinomial logistic regression on standardised features with an L2 penalty (C = 1,
sklearn's default) fitted by L-BFGS (scipy); PCA is an SVD. numpy and scipy only: no scikit-learn.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pifi_jax.hub import gguf
from pifi_jax.hub.layer import load_layer
from pifi_jax.hub.pretrained import base_model_prefix, open_checkpoint
from pifi_jax.models import registry

METHODS = ("effect", "corr")
# The tensor(s) that turn token ids into the first layer's input, per decoder family.
_TOKEN_EMBEDDINGS = {
    "llama": "embed_tokens",
    "mistral": "embed_tokens",
    "qwen2": "embed_tokens",
    "gemma2": "embed_tokens",
    "falcon": "word_embeddings",
    "gpt2": "wte",
}


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
    """Hyperparameters of the selection (names as the spec's `selection_*` options)."""

    method: str = "effect"
    samples: int = 400
    pcs: int = 16
    top_pcs: int = 5
    lambdas: tuple[float, ...] = (0.5, 1.0)
    holdout: float = 0.3
    max_length: int = 128
    batch_size: int = 16
    dtype: Any = jnp.bfloat16
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"selection method {self.method!r} is not one of {METHODS}")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout must be in (0, 1), got {self.holdout}")
        if self.top_pcs > self.pcs:
            raise ValueError(f"top_pcs ({self.top_pcs}) cannot exceed pcs ({self.pcs})")


@dataclasses.dataclass
class LayerScores:
    """Per-layer results of a selection; arrays have one entry per layer (0 = first)."""

    method: str
    effect: np.ndarray  # max over lambda of max(0, acc - acc_counterfactual)
    correlation: np.ndarray  # mean of the top |r| of the layer's components
    accuracy: np.ndarray  # held-out probe accuracy on X_l
    counterfactual: dict[float, np.ndarray]  # lambda -> held-out accuracy on X_l - lambda R_l
    samples: int

    @property
    def score(self) -> np.ndarray:
        return self.correlation if self.method == "corr" else self.effect

    @property
    def chosen(self) -> int:
        # lexsort sorts by its last key first: the score, then the correlation breaks ties.
        order = np.lexsort((-np.arange(len(self.score)), self.correlation, self.score))
        return int(order[-1])

    def rows(self) -> list[dict[str, float | int | str]]:
        rows = []
        for layer in range(len(self.effect)):
            row = {
                "layer": layer,
                "effect": float(self.effect[layer]),
                "correlation": float(self.correlation[layer]),
                "accuracy": float(self.accuracy[layer]),
            }
            for lam, accs in self.counterfactual.items():
                row[f"accuracy_minus_{lam:g}R"] = float(accs[layer])
            row["chosen"] = "*" if layer == self.chosen else ""
            rows.append(row)
        return rows

    def table(self) -> str:
        rows = self.rows()
        keys = list(rows[0])
        lines = ["  ".join(f"{k:>{max(len(k), 6)}}" for k in keys)]
        for row in rows:
            cells = [f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()]
            lines.append(
                "  ".join(f"{c:>{max(len(k), 6)}}" for c, k in zip(cells, keys, strict=True))
            )
        lines.append(f"chosen layer: {self.chosen} (by {self.method}, {self.samples} examples)")
        return "\n".join(lines)

    def write_csv(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        rows = self.rows()
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return path

    def plot(self, path: str | os.PathLike, title: str = "") -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        layers = np.arange(len(self.score))
        fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(layers)), 3.5))
        colors = ["tab:red" if i == self.chosen else "tab:blue" for i in layers]
        ax.bar(layers, self.score, color=colors)
        ax.set_xlabel("layer")
        ax.set_ylabel("effect" if self.method == "effect" else "mean top |corr|")
        ax.set_title(title or f"layer selection ({self.method}); chosen: {self.chosen}")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


# ---------------------------------------------------------------------------------------------
# Step 1: pooled hidden states of every layer, one layer's weights at a time.


def llm_tokenizer(llm_path: str | os.PathLike):
    """The LLM's own tokenizer: from a GGUF file (transformers reads it offline) or the checkpoint."""
    import transformers

    gguf_file = gguf.find_gguf(llm_path)
    if gguf_file is not None:
        return transformers.AutoTokenizer.from_pretrained(
            str(gguf_file.parent), gguf_file=gguf_file.name
        )
    from pifi_jax.hub.files import resolve_checkpoint

    name = str(llm_path)
    local = name.startswith("asset:") or Path(name).expanduser().is_dir()
    return transformers.AutoTokenizer.from_pretrained(
        str(resolve_checkpoint(name)) if local else name
    )


def _embedder(llm_path, dtype):
    """(config, ids [b, s] -> first layer input [b, s, d]), reading only the embedding tensors."""
    reader, hf_config = open_checkpoint(llm_path)
    config = registry.config_from_hf(hf_config)
    if config.model_type not in _TOKEN_EMBEDDINGS:
        raise ValueError(f"layer selection does not support {config.model_type!r} models")
    family = registry.family_for(config.model_type)
    prefix = base_model_prefix(family, config)

    def tensor(name):  # kept on the host in its stored dtype; rows are gathered there
        for key in (f"{prefix}.{name}.weight", f"{name}.weight"):
            if key in reader:
                return np.asarray(reader.get(key))
        raise KeyError(f"{name}.weight not found in {reader.directory}")

    table = tensor(_TOKEN_EMBEDDINGS[config.model_type])  # [vocab, d]
    positions = tensor("wpe") if config.model_type == "gpt2" else None

    def embed(ids: np.ndarray, mask: np.ndarray) -> jax.Array:
        x = table[ids].astype(np.float32)  # [batch, length, d]
        if config.model_type == "gemma2":
            # As Gemma2Model: sqrt(hidden), rounded to the weights' storage dtype.
            x = x * np.float32(jnp.asarray(math.sqrt(config.hidden_size), dtype))
        if positions is not None:
            x = x + positions[np.clip(np.cumsum(mask, axis=1) - 1, 0, None)].astype(np.float32)
        return jnp.asarray(x, dtype)

    return config, embed


def _length_batches(lengths: Sequence[int], batch_size: int, max_length: int):
    """Rows sorted by length, cut into batches; each padded to a power-of-two length (>= 16), so
    few shapes are compiled. Yields (rows [batch_size] with -1 for filler rows, padded length)."""
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        longest = max(int(lengths[r]) for r in rows)
        padded = min(max_length, max(16, 1 << (longest - 1).bit_length()))
        filler = np.full(batch_size - len(rows), -1)
        yield np.concatenate([rows, filler]).astype(np.int64), padded


def layer_features(
    llm_path: str | os.PathLike,
    texts: Sequence[Sequence[str]],
    *,
    tokenizer=None,
    max_length: int = 128,
    batch_size: int = 16,
    dtype: Any = jnp.bfloat16,
    log=print,
) -> np.ndarray:
    """Mean-pooled output of every layer: float32 [num_layers, n, hidden].

    texts: one sequence of strings per text column (a sentence pair is two columns).
    """
    tokenizer = tokenizer if tokenizer is not None else llm_tokenizer(llm_path)
    ids = tokenizer(*texts, truncation=True, max_length=max_length)["input_ids"]
    n = len(ids)
    config, embed = _embedder(llm_path, dtype)
    batches = []
    for rows, length in _length_batches([len(x) for x in ids], batch_size, max_length):
        tokens = np.zeros((batch_size, length), np.int32)
        mask = np.zeros((batch_size, length), np.int32)
        for i, row in enumerate(rows):
            if row >= 0:
                tokens[i, : len(ids[row])], mask[i, : len(ids[row])] = ids[row], 1
        batches.append((rows, jnp.asarray(mask), embed(tokens, mask)))

    features = np.zeros((config.num_layers, n, config.hidden_size), np.float32)
    for index in range(config.num_layers):
        layer, params = load_layer(llm_path, index, dtype=dtype)

        @jax.jit
        def forward(params, x, mask, layer=layer):
            y = layer.apply({"params": params}, x, attention_mask=mask, causal=True)
            weights = mask.astype(jnp.float32)[:, :, None]  # [batch, length, 1]
            pooled = jnp.sum(y.astype(jnp.float32) * weights, 1) / jnp.maximum(weights.sum(1), 1)
            return y, pooled  # [batch, length, d], [batch, d]

        for b, (rows, mask, x) in enumerate(batches):
            y, pooled = forward(params, x, mask)
            batches[b] = (rows, mask, y)
            real = rows >= 0
            features[index, rows[real]] = np.asarray(pooled)[real]
        del params
        log(f"layer {index + 1}/{config.num_layers}: hidden states of {n} examples")
    return features


# ---------------------------------------------------------------------------------------------
# Steps 2-4: PCA, label correlation, counterfactual, probe.


def stratified_split(
    labels: np.ndarray, holdout: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, held-out rows): `holdout` of each class held out (at least one of each class
    that has two or more rows)."""
    rng = np.random.default_rng(seed)
    fit, held = [], []
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        count = int(round(holdout * len(rows))) if len(rows) > 1 else 0
        count = min(max(count, 1 if len(rows) > 1 else 0), len(rows) - 1)
        held.append(rows[:count])
        fit.append(rows[count:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(held))


def label_correlation(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """|Pearson r| of each column of scores [n, k] with the label; multiclass: the largest over
    one-vs-rest indicators. A constant column scores 0."""
    classes = np.unique(labels)
    targets = [labels == classes[-1]] if len(classes) <= 2 else [labels == c for c in classes]
    z = scores - scores.mean(0)
    z_norm = np.linalg.norm(z, axis=0)
    best = np.zeros(scores.shape[1])
    for target in targets:
        t = target.astype(np.float64) - target.mean()
        denom = z_norm * np.linalg.norm(t)
        r = np.divide(np.abs(t @ z), denom, out=np.zeros_like(best), where=denom > 0)
        best = np.maximum(best, r)
    return best


@dataclasses.dataclass
class LogisticProbe:
    """Multinomial logistic regression on standardised features, L2 penalty 1/(2C) ||W||^2."""

    mean: np.ndarray
    std: np.ndarray
    weights: np.ndarray  # [d + 1, classes], last row the intercept
    classes: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, labels: np.ndarray, c: float = 1.0, max_iter: int = 500):
        from scipy import optimize

        mean, std = x.mean(0), x.std(0)
        std = np.where(std > 1e-12, std, 1.0)
        classes, y = np.unique(labels, return_inverse=True)
        z = np.hstack([(x - mean) / std, np.ones((len(x), 1))])  # [n, d + 1]
        onehot = np.eye(len(classes))[y]  # [n, classes]
        penalty = np.ones((z.shape[1], 1))
        penalty[-1] = 0.0  # the intercept is not penalised

        def loss_and_grad(flat):
            w = flat.reshape(z.shape[1], len(classes))
            logits = z @ w
            logits -= logits.max(1, keepdims=True)
            log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
            loss = -c * np.sum(onehot * log_probs) + 0.5 * np.sum(penalty * w * w)
            grad = c * z.T @ (np.exp(log_probs) - onehot) + penalty * w
            return loss, grad.ravel()

        start = np.zeros(z.shape[1] * len(classes))
        result = optimize.minimize(
            loss_and_grad, start, jac=True, method="L-BFGS-B", options={"maxiter": max_iter}
        )
        return cls(mean, std, result.x.reshape(z.shape[1], len(classes)), classes)

    def predict(self, x: np.ndarray) -> np.ndarray:
        z = np.hstack([(x - self.mean) / self.std, np.ones((len(x), 1))])
        return self.classes[np.argmax(z @ self.weights, axis=1)]

    def accuracy(self, x: np.ndarray, labels: np.ndarray) -> float:
        return float(np.mean(self.predict(x) == labels))


def score_layer(
    features: np.ndarray, labels: np.ndarray, config: SelectionConfig, with_probe: bool = True
) -> dict[str, Any]:
    """Correlation score, probe accuracy and counterfactual accuracies of one layer's X [n, d]."""
    x = features.astype(np.float64)
    fit, held = stratified_split(labels, config.holdout, config.seed)
    center = x[fit].mean(0)
    _, _, vt = np.linalg.svd(x[fit] - center, full_matrices=False)
    components = vt[: config.pcs]  # [k, d]
    scores = (x - center) @ components.T  # [n, k]
    correlation = label_correlation(scores[fit], labels[fit])  # [k]
    top = np.argsort(-correlation, kind="stable")[: config.top_pcs]
    explained = scores[:, top] @ components[top]  # R [n, d]
    out = {"correlation": float(correlation[top].mean()), "accuracy": math.nan, "effect": math.nan}
    out["counterfactual"] = {lam: math.nan for lam in config.lambdas}
    if with_probe:
        probe = LogisticProbe.fit(x[fit], labels[fit])
        accuracy = probe.accuracy(x[held], labels[held])
        for lam in config.lambdas:
            out["counterfactual"][lam] = probe.accuracy(
                x[held] - lam * explained[held], labels[held]
            )
        out["accuracy"] = accuracy
        out["effect"] = max(0.0, max(accuracy - a for a in out["counterfactual"].values()))
    return out


def score_layers(features: np.ndarray, labels: np.ndarray, config: SelectionConfig) -> LayerScores:
    """Scores of every layer from features [layers, n, d]."""
    labels = np.asarray(labels)
    results = [score_layer(f, labels, config, config.method == "effect") for f in features]
    return LayerScores(
        method=config.method,
        effect=np.array([r["effect"] for r in results]),
        correlation=np.array([r["correlation"] for r in results]),
        accuracy=np.array([r["accuracy"] for r in results]),
        counterfactual={
            lam: np.array([r["counterfactual"][lam] for r in results]) for lam in config.lambdas
        },
        samples=len(labels),
    )


def sample_examples(
    texts: Sequence[Sequence[str]], labels: np.ndarray, samples: int, seed: int
) -> tuple[list[list[str]], np.ndarray]:
    """A seeded random subset of `samples` examples (all of them if there are fewer)."""
    labels = np.asarray(labels)
    rows = np.random.default_rng(seed).permutation(len(labels))[:samples]
    rows = np.sort(rows)
    return [[column[i] for i in rows] for column in texts], labels[rows]


def select_layer(
    llm_path: str | os.PathLike,
    texts: Sequence[Sequence[str]],
    labels: Sequence[int] | np.ndarray,
    config: SelectionConfig = SelectionConfig(),
    *,
    tokenizer=None,
    log=print,
) -> LayerScores:
    """Scores every layer of the LLM on (a sample of) the labelled examples; `.chosen` is the pick.

    texts: one sequence of strings per text column; labels: class ids (classification only).
    """
    texts = [texts] if isinstance(texts[0], str) else texts
    texts, labels = sample_examples(texts, np.asarray(labels), config.samples, config.seed)
    if len(np.unique(labels)) < 2:
        raise ValueError("layer selection needs examples of at least two classes")
    features = layer_features(
        llm_path,
        texts,
        tokenizer=tokenizer,
        max_length=config.max_length,
        batch_size=config.batch_size,
        dtype=config.dtype,
        log=log,
    )
    return score_layers(features, labels, config)
