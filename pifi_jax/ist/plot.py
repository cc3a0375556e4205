"""IST layer importance scores over training: read them back from metrics.jsonl, draw a heat map."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SCORE_PREFIX = "ist/score/"
COLORBAR_LABEL = "importance score (high = less important)"


def _edges(centres: np.ndarray) -> np.ndarray:
    """[T + 1] cell edges around strictly increasing centres [T]: midpoints, the ends mirrored."""
    if len(centres) == 1:
        return np.array([centres[0] - 0.5, centres[0] + 0.5], np.float64)
    mid = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[2 * centres[0] - mid[0]], mid, [2 * centres[-1] - mid[-1]]])


def plot_scores(
    steps: Sequence[int], scores: np.ndarray, path: str | Path, title: str | None = None
) -> Path:
    """Heat map PNG of the layer scores: x = training step of each refresh, y = layer (0 at the
    bottom), a diverging colormap centred at 0 (red = high score = less important).

    steps [T] strictly increasing; scores [T, L] (row t = the scores after the refresh at steps[t]).
    Returns the path written.
    """
    steps = np.asarray(steps, np.float64)  # [T]
    scores = np.asarray(scores, np.float64)  # [T, L]
    if scores.ndim != 2:
        raise ValueError(f"scores must have shape [T, L] (refreshes x layers); got {scores.shape}")
    if steps.ndim != 1 or steps.shape[0] != scores.shape[0]:
        raise ValueError(
            f"steps must have shape [T] with T = scores.shape[0] = {scores.shape[0]}; "
            f"got steps of shape {steps.shape}"
        )
    if scores.size == 0:
        raise ValueError(f"nothing to plot: scores of shape {scores.shape}")
    if len(steps) > 1 and not np.all(np.diff(steps) > 0):
        raise ValueError("steps must be strictly increasing")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.colors
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    num_steps, num_layers = scores.shape
    finite = np.abs(scores[np.isfinite(scores)])
    vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    norm = matplotlib.colors.Normalize(vmin=-vmax, vmax=vmax)  # symmetric: white is exactly 0

    height = min(12.0, max(3.0, 1.6 + 0.17 * num_layers))
    fig, ax = plt.subplots(figsize=(8.0, height), dpi=120)
    mesh = ax.pcolormesh(
        _edges(steps),
        np.arange(num_layers + 1) - 0.5,
        scores.T,  # [L, T]: rows are layers, drawn upwards from layer 0
        cmap="RdBu_r",
        norm=norm,
        shading="flat",
        rasterized=True,
    )
    ax.set_ylim(-0.5, num_layers - 0.5)
    if num_layers <= 40:
        ax.set_yticks(range(num_layers))
        ax.tick_params(axis="y", labelsize=6 if num_layers > 16 else 8)
    else:
        ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(nbins=10, integer=True))
    ax.set_xlabel("training step (score refresh)")
    ax.set_ylabel("layer")
    ax.set_title(
        title or f"IST layer scores ({num_layers} layers, {num_steps} refreshes)", fontsize=10
    )
    colorbar = fig.colorbar(mesh, ax=ax, pad=0.02)
    colorbar.set_label(COLORBAR_LABEL)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _layer_count(record: dict) -> int:
    """How many consecutive keys ist/score/0, ist/score/1, ... the record has."""
    count = 0
    while f"{SCORE_PREFIX}{count}" in record:
        count += 1
    return count


def scores_from_metrics(metrics_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(steps int64 [T], scores float64 [T, L]) from a metrics.jsonl: one row per line that has
    the keys ist/score/0 .. ist/score/{L-1}, in file order. Lines without scores are skipped and a
    last line torn by a kill (invalid JSON) is ignored; a score-less file, an invalid line before the
    last, or score lines with different layer counts raise a ValueError."""
    metrics_path = Path(metrics_path)
    lines = metrics_path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    steps: list[int] = []
    rows: list[list[float]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):
                break  # torn by a kill mid-write
            raise ValueError(f"{metrics_path}:{number}: invalid JSON ({error})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{metrics_path}:{number}: expected a JSON object per line")
        num_layers = _layer_count(record)
        # Layer keys only (a digit suffix), not e.g. ist/score/mean; they must run 0..L-1.
        stray = [
            k for k in record if k.startswith(SCORE_PREFIX) and k[len(SCORE_PREFIX) :].isdigit()
        ]
        if len(stray) != num_layers:
            raise ValueError(
                f"{metrics_path}:{number}: score keys are not {SCORE_PREFIX}0..{num_layers - 1}: "
                f"{sorted(stray)}"
            )
        if num_layers == 0:
            continue
        if rows and num_layers != len(rows[0]):
            raise ValueError(
                f"{metrics_path}:{number}: {num_layers} layer scores, earlier lines had {len(rows[0])}"
            )
        if "step" not in record:
            raise ValueError(f"{metrics_path}:{number}: a score record without a 'step' key")
        steps.append(int(record["step"]))
        rows.append([float(record[f"{SCORE_PREFIX}{i}"]) for i in range(num_layers)])
    if not rows:
        raise ValueError(f"{metrics_path} has no layer scores (no line with {SCORE_PREFIX}0, ...)")
    return np.asarray(steps, np.int64), np.asarray(rows, np.float64)
