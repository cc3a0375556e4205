"""Sweeps: one run per value of one or more config keys, a CSV of the results and a plot of
validation accuracy against trainable parameters (the PEFT size study of the spec).

    rows = run_sweep(config, ["peft.r", "peft.lora_alpha"], [1, 2, 4, 8], "runs/lora_sweep")

Each run lives in its own sub-directory and is skipped when its results.json exists, so a sweep
interrupted at any point resumes where it stopped (a half-finished run resumes from its checkpoint).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import ml_collections

from pifi_jax.data import task_for_config
from pifi_jax.train.loop import train_and_evaluate

CSV_NAME, PLOT_NAME = "sweep.csv", "sweep.png"


def _set(config: ml_collections.ConfigDict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
        node = getattr(node, name)
    if leaf not in node:
        raise KeyError(f"sweep key {key!r} is not a field of the config")
    current = node[leaf]
    # Values given as text on the command line take the field's type (int, float, bool, str).
    if isinstance(value, str) and not isinstance(current, str) and current is not None:
        value = (
            (value.lower() in ("1", "true", "yes"))
            if isinstance(current, bool)
            else type(current)(value)
        )
    node[leaf] = value


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def run_sweep(
    config: ml_collections.ConfigDict, keys: Sequence[str], values: Sequence, workdir: str | Path
) -> list[dict]:
    """Trains once per value (every key in `keys` set to it); writes sweep.csv and sweep.png."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    label = ",".join(keys)
    rows = []
    for value in values:
        run_config = ml_collections.ConfigDict(config.to_dict())
        for key in keys:
            _set(run_config, key, value)
        run_dir = workdir / f"{label}={value}"
        done = run_dir / "results.json"
        results = (
            json.loads(done.read_text())
            if done.exists()
            else train_and_evaluate(run_config, run_dir)
        )
        rows.append({label: value, **results, "adapter_bytes": _dir_bytes(run_dir / "adapter")})
    write_csv(rows, workdir / CSV_NAME)
    chosen = f"validation/{config.train.best_metric or task_for_config(config).primary_metric}"
    plot(
        [(label, rows)], workdir / PLOT_NAME, metric=chosen if chosen in rows[0] else _primary(rows)
    )
    return rows


def _primary(rows: list[dict]) -> str:
    return (
        "validation/accuracy"
        if "validation/accuracy" in rows[0]
        else next(k for k in rows[0] if k.startswith("validation/"))
    )


def write_csv(rows: list[dict], path: Path) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _number(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _compact(x: float) -> str:
    """20000 -> "20k", 1500000 -> "1.5M"."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= size:
            return f"{x / size:g}{suffix}"
    return f"{x:g}"


def plot(
    series: Sequence[tuple[str, list[dict]]], path: str | Path, metric: str = "validation/accuracy"
) -> None:
    """`metric` against trainable parameters (log scale), one line per (name, rows) series; each
    point is labelled with its row's first column (the swept value, as run_sweep writes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for name, rows in series:
        key = next(iter(rows[0]))
        points = sorted((r["trainable_params"], r[metric], r[key]) for r in rows)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        for x, y, value in points:
            ax.annotate(str(value), (x, y), textcoords="offset points", xytext=(3, 4), fontsize=7)
    ax.set_xscale("log")
    # Ticks at 1, 2 and 5 per decade, written compactly (20k, 500k, 1M); no unlabelled clutter.
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: _compact(x)))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_title(f"{metric} vs trainable parameters", fontsize=10)
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_sweeps(
    directories: Sequence[str | Path],
    path: str | Path,
    names: Sequence[str] | None = None,
    metric: str | None = None,
) -> list[tuple[str, list[dict]]]:
    """One plot of several finished sweeps (each directory's sweep.csv), e.g. LoRA ranks next to
    adapter bottleneck sizes; `names` label the lines (default: the directory names)."""
    directories = [Path(d) for d in directories]
    names = list(names) if names else [d.name for d in directories]
    if len(names) != len(directories):
        raise ValueError(f"{len(names)} names for {len(directories)} sweep directories")
    series = []
    for name, directory in zip(names, directories, strict=True):
        csv_path = directory / CSV_NAME
        if not csv_path.is_file():
            raise FileNotFoundError(
                f"{csv_path} does not exist: run the sweep in {directory} first"
            )
        series.append((name, read_csv(csv_path)))
    plot(series, path, metric=metric or _primary(series[0][1]))
    return series
