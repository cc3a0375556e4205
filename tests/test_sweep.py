"""launch.sweep / run_sweep on the tiny setting: one run per value, CSV + plot, resumable."""

from __future__ import annotations

import json
import sys

import pytest

from pifi_jax.train.sweep import plot_sweeps, read_csv
from tests.conftest import run_child, tiny_overrides
from tests.run_checks import assert_classification_results


@pytest.mark.slow  # a generative sweep runs in the default set (test_generative.py)
def test_lora_rank_sweep_writes_csv_and_plot_and_resumes(tiny_bert_dir, tiny_task_files, tmp_path):
    argv = [
        sys.executable,
        "-m",
        "launch.sweep",
        "--config=configs/classify.py:runlocal",
        *tiny_overrides(tiny_bert_dir, tiny_task_files),
        "--config.peft.method=lora",
        "--config.train.num_steps=1",
        "--sweep=peft.r,peft.lora_alpha=1,4",
        f"--workdir={tmp_path}",
    ]
    run_child(argv)
    rows = read_csv(tmp_path / "sweep.csv")
    assert [row["peft.r,peft.lora_alpha"] for row in rows] == [1, 4]
    # LoRA on query,value of 2 layers of width 32: 2 * 2 * (32 r + r 32) + the 2-way head (66).
    assert [row["trainable_params"] for row in rows] == [2 * 2 * 64 * r + 66 for r in (1, 4)]
    # Each row holds its own run's results: accuracy as recomputed from that run's predictions.
    for row in rows:
        run = tmp_path / f"peft.r,peft.lora_alpha={row['peft.r,peft.lora_alpha']}"
        results = json.loads((run / "results.json").read_text())
        assert row["trainable_params"] == results["trainable_params"]
        assert row["validation/accuracy"] == pytest.approx(results["validation/accuracy"])
        assert_classification_results(run, results, "validation", tiny_task_files["validation"])
        adapter = [f.stat().st_size for f in (run / "adapter").rglob("*") if f.is_file()]
        assert row["adapter_bytes"] == sum(adapter) > 0
    png = (tmp_path / "sweep.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000

    # A second invocation finds every results.json and trains nothing.
    (tmp_path / "sweep.png").unlink()
    again = run_child(argv)
    assert "steps/epoch" not in again.stdout  # train_and_evaluate prints this when it starts
    assert read_csv(tmp_path / "sweep.csv") == rows
    assert (tmp_path / "sweep.png").exists()


def test_finished_sweeps_plot_together(tmp_path):
    """--combine: each sweep.csv one line, no training; a missing sweep is named."""
    from pifi_jax.train.sweep import write_csv

    for name, key, sizes in (
        ("lora", "peft.r", (2, 8)),
        ("adapter", "peft.bottleneck_size", (16,)),
    ):
        rows = [
            {key: s, "trainable_params": 100 * s, "validation/accuracy": 0.5 + s / 100}
            for s in sizes
        ]
        (tmp_path / name).mkdir()
        write_csv(rows, tmp_path / name / "sweep.csv")
    out = tmp_path / "both.png"
    argv = [
        sys.executable,
        "-m",
        "launch.sweep",
        f"--combine={tmp_path / 'lora'},{tmp_path / 'adapter'}",
    ]
    run_child([*argv, "--names=LoRA,adapters", f"--plot={out}"], timeout=120)
    assert out.read_bytes().startswith(b"\x89PNG")
    series = plot_sweeps([tmp_path / "lora", tmp_path / "adapter"], tmp_path / "again.png")
    assert [(name, len(rows)) for name, rows in series] == [("lora", 2), ("adapter", 1)]
    with pytest.raises(FileNotFoundError, match="missing"):
        plot_sweeps([tmp_path / "missing"], tmp_path / "x.png")


def test_parameter_counts_are_written_compactly_on_the_axis():
    from pifi_jax.train.sweep import _compact

    assert [_compact(x) for x in (500, 20_000, 74_498, 1_500_000, 2e9)] == [
        "500",
        "20k",
        "74.498k",
        "1.5M",
        "2G",
    ]
