"""The paper's comparison as one job: base vs PiFi, over seeds and tasks, next to the paper's numbers.

    rows = run_grid(config, ["sst2", "imdb"], seeds=[2023, 2024, 2025], out_dir="runs/exp")
    table = summarize(rows, slm="bert")     # per task and method: mean, std, n
    write_reports(rows, table, "runs/exp")  # runs.csv, summary.csv, summary.md

Each run is an ordinary training run in <out_dir>/<task>/<method>/seed<seed>; one that already
wrote results.json is not run again and an interrupted one resumes, so the same command finishes
an interrupted grid. Scores are those of the best-validation checkpoint on the test split (the
validation split for tasks without one), in percent: accuracy and macro-F1 for classification,
else the task's primary metric and a second one (`metrics_of`: ROUGE-L and BLEU for generation,
F1 and exact match for extractive QA). Imports the trainer, so it is not re-exported
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
# Short column names of the table.
_SHORT = {"accuracy": "acc", "f1_macro": "F1", "exact_match": "EM"}


def metrics_of(task_name: str) -> tuple[str, str]:
    """The two scores a grid reports for a task: accuracy and macro-F1 for classification, else
    the task's primary metric and a second one (BLEU beside ROUGE-L, exact match beside F1)."""
    from pifi_jax.data import get_task

    task = get_task(task_name)
    if task.kind == "classification" and not task.is_regression:
        return "accuracy", "f1_macro"
    primary = task.primary_metric
    others = [m for m in task.metrics if m != primary]
    preferred = [m for m in ("bleu", "exact_match", "f1", "spearman") if m in others]
    return primary, (preferred or others or [primary])[0]


def run_grid(
    config,
    tasks: Sequence[str],
    seeds: Sequence[int],
    out_dir: str | os.PathLike,
    methods: Sequence[str] = METHODS,
    log=print,
) -> list[dict]:
    """Trains `config` for every task x method x seed; one row of scores per run (the two
    `metrics_of` the task, in percent). The tasks of one grid share their metrics."""
    from pifi_jax.train.loop import train_unless_finished

    kinds = {task: metrics_of(task) for task in tasks}
    if len(set(kinds.values())) > 1:
        raise ValueError(
            f"the tasks of one grid are scored alike; these are not: {kinds} (run them apart)"
        )
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
                for metric in kinds[task]:
                    value = results.get(f"{split}/{metric}")
                    # ROUGE / BLEU / EM / F1 of generation and QA are percentages already.
                    scale = (
                        100.0 if metric in ("accuracy", "f1_macro", "pearson", "spearman") else 1.0
                    )
                    row[metric] = math.nan if value is None else scale * value
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
        first, second = metrics_of(task)
        entry = {"task": task, "metric": first, "metric2": second}
        for method in METHODS:
            runs = [r for r in rows if r["task"] == task and r["method"] == method]
            entry[f"{method}_n"] = len(runs)
            for metric in (first, second):
                mean, std = _mean_std([r[metric] for r in runs])
                entry[f"{method}_{metric}_mean"], entry[f"{method}_{metric}_std"] = mean, std
        entry[f"delta_{first}"] = entry[f"pifi_{first}_mean"] - entry[f"base_{first}_mean"]
        base, pifi = paper.get(task, (math.nan, math.nan))
        entry.update(paper_base=base, paper_pifi=pifi, paper_delta=pifi - base)
        table.append(entry)
    if len(table) > 1:
        average = {"task": "average", "metric": table[0]["metric"], "metric2": table[0]["metric2"]}
        for key in table[0]:
            if key not in average:
                values = [row[key] for row in table]
                average[key] = float(np.mean(values))  # nan if any task lacks the value
        table.append(average)
    return table


def _cell(mean: float, std: float | None = None) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.2f}" if std is None or math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def markdown(table: list[dict], title: str = "") -> str:
    """The summary as a markdown table (the two scores in %, mean ± std over seeds): accuracy and
    macro-F1 for classification, the task's metrics otherwise."""
    first, second = table[0]["metric"], table[0]["metric2"]
    a, b = _SHORT.get(first, first), _SHORT.get(second, second)
    header = (
        f"| task | seeds | base {a} | PiFi {a} | Δ {a} | base {b} | PiFi {b} | paper base | "
        "paper PiFi | paper Δ |"
    )
    lines = [f"### {title}", ""] if title else []
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for row in table:
        seeds = "" if row["task"] == "average" else f"{row['base_n']}/{row['pifi_n']}"
        cells = [
            row["task"],
            seeds,
            _cell(row[f"base_{first}_mean"], row[f"base_{first}_std"]),
            _cell(row[f"pifi_{first}_mean"], row[f"pifi_{first}_std"]),
            _cell(row[f"delta_{first}"]),
            _cell(row[f"base_{second}_mean"], row[f"base_{second}_std"]),
            _cell(row[f"pifi_{second}_mean"], row[f"pifi_{second}_std"]),
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
