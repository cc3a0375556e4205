"""The paper's comparison as one job: base vs PiFi, over seeds and tasks, next to the paper's numbers.

    rows = run_grid(config, ["sst2", "imdb"], seeds=[2023, 2024, 2025], out_dir="runs/exp")
    table = summarize(rows, slm="bert")     # per task and method: mean, std, n
    write_reports(rows, table, "runs/exp")  # runs.csv, summary.csv, summary.md

Each run is an ordinary training run in <out_dir>/<task>/<method>/seed<seed>; one that already
wrote results.json is not run again and an interrupted one resumes, so the same command finishes
an interrupted grid. Scores are those of the best-validation checkpoint on the test split (the
validation split for tasks without one), in percent. Imports the trainer, so it is not re-exported
by pifi_jax.pifi (which the trainer itself imports).
"""

from __future__ import annotations

import copy
import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# The paper's accuracy (%), SLM + Llama-3.1-8B's last layer (shared/spec/pifi.md): (base, PiFi).
PAPER_ACCURACY = {
    "bert": {
        "sst2": (89.41, 91.50),
        "imdb": (85.10, 87.09),
        "tweet_eval_sentiment": (86.90, 92.95),
        "tweet_eval_offensive": (83.15, 86.03),
        "cola": (80.10, 82.07),
        "mnli": (82.00, 82.74),
        "snli": (89.10, 89.48),
    },
    "electra": {
        "sst2": (93.42, 94.13),
        "imdb": (88.31, 89.40),
        "tweet_eval_sentiment": (90.58, 93.31),
        "tweet_eval_offensive": (83.52, 84.99),
        "cola": (83.99, 86.26),
        "mnli": (85.41, 86.47),
        "snli": (90.11, 90.48),
    },
    "debertav3": {
        "sst2": (93.74, 95.01),
        "imdb": (89.45, 89.83),
        "tweet_eval_sentiment": (91.29, 93.80),
        "tweet_eval_offensive": (83.60, 85.60),
        "cola": (84.75, 86.07),
        "mnli": (87.52, 87.98),
        "snli": (90.94, 91.05),
    },
}
PAPER_TASKS = tuple(PAPER_ACCURACY["bert"])
METHODS = ("base", "pifi")
_METRICS = ("accuracy", "f1_macro")


def run_grid(
    config,
    tasks: Sequence[str],
    seeds: Sequence[int],
    out_dir: str | os.PathLike,
    methods: Sequence[str] = METHODS,
    log=print,
) -> list[dict]:
    """Trains `config` for every task x method x seed; one row of scores per run."""
    from pifi_jax.train.loop import train_unless_finished

    out_dir = Path(out_dir)
    rows = []
    for task in tasks:
        for method in methods:
            for seed in seeds:
                run_config = copy.deepcopy(config)
                run_config.task, run_config.seed = task, int(seed)
                run_config.pifi.method = method
                results = train_unless_finished(
                    run_config,
                    out_dir / task / method / f"seed{seed}",
                    f"{task} {method} seed {seed}",
                    log,
                )
                split = "test" if any(k.startswith("test/") for k in results) else "validation"
                row = {"task": task, "method": method, "seed": int(seed), "split": split}
                for metric in _METRICS:
                    value = results.get(f"{split}/{metric}")
                    row[metric] = math.nan if value is None else 100.0 * value
                rows.append(row)
    return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    std = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan  # one run: no spread
    return float(np.mean(values)), std


def summarize(rows: list[dict], slm: str | None = None) -> list[dict]:
    """Per task: mean and std (over seeds) of each method's scores, their difference, and the
    paper's accuracies for `slm` where the paper has them; a last row averages over the tasks."""
    paper = PAPER_ACCURACY.get(slm or "", {})
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    table = []
    for task in tasks:
        entry = {"task": task}
        for method in METHODS:
            runs = [r for r in rows if r["task"] == task and r["method"] == method]
            entry[f"{method}_n"] = len(runs)
            for metric in _METRICS:
                mean, std = _mean_std([r[metric] for r in runs])
                entry[f"{method}_{metric}_mean"], entry[f"{method}_{metric}_std"] = mean, std
        entry["delta_accuracy"] = entry["pifi_accuracy_mean"] - entry["base_accuracy_mean"]
        base, pifi = paper.get(task, (math.nan, math.nan))
        entry.update(paper_base=base, paper_pifi=pifi, paper_delta=pifi - base)
        table.append(entry)
    if len(table) > 1:
        average = {"task": "average"}
        for key in table[0]:
            if key != "task":
                values = [row[key] for row in table]
                average[key] = float(np.mean(values))  # nan if any task lacks the value
        table.append(average)
    return table


def _cell(mean: float, std: float | None = None) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.2f}" if std is None or math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def markdown(table: list[dict], title: str = "") -> str:
    """The summary as a markdown table (accuracy and macro-F1 in %, mean ± std over seeds)."""
    header = (
        "| task | seeds | base acc | PiFi acc | Δ acc | base F1 | PiFi F1 | paper base | "
        "paper PiFi | paper Δ |"
    )
    lines = [f"### {title}", ""] if title else []
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for row in table:
        seeds = "" if row["task"] == "average" else f"{row['base_n']}/{row['pifi_n']}"
        cells = [
            row["task"],
            seeds,
            _cell(row["base_accuracy_mean"], row["base_accuracy_std"]),
            _cell(row["pifi_accuracy_mean"], row["pifi_accuracy_std"]),
            _cell(row["delta_accuracy"]),
            _cell(row["base_f1_macro_mean"], row["base_f1_macro_std"]),
            _cell(row["pifi_f1_macro_mean"], row["pifi_f1_macro_std"]),
            _cell(row["paper_base"]),
            _cell(row["paper_pifi"]),
            _cell(row["paper_delta"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_reports(rows: list[dict], table: list[dict], out_dir, title: str = "") -> Path:
    """runs.csv (every run), summary.csv and summary.md in out_dir; returns summary.md's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(out_dir / "runs.csv", rows)
    _write_csv(out_dir / "summary.csv", table)
    path = out_dir / "summary.md"
    path.write_text(markdown(table, title), encoding="utf-8")
    return path
