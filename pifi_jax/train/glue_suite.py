"""The GLUE suite: one config fine-tuned on each of the nine GLUE tasks, the table in the GLUE
paper's layout, and a gluebenchmark.com submission archive (what `python -m launch.glue` runs).

    results = run_suite(config, "runs/glue_minilm_lora")
    print(results["table"])          # also <workdir>/glue.md; the numbers in <workdir>/glue.json

Every task is an ordinary run of `config` with `config.task` set to the suite's registry task
(pifi_jax.data.glue.SUITE), in <workdir>/<task>/: its results.json, checkpoints, adapter and
predictions as any run has. A task whose run finished (results.json) is not trained again, so the
same command resumes an interrupted suite; an unfinished run resumes from its checkpoint.

What the table reports (pifi_jax/data/glue.py says why): each run's test split, which is GLUE's
validation split (the registry's rule: 20% of GLUE's train is validation); MNLI-m is the MNLI
run's best checkpoint scored on validation_matched (its registry test split is the mismatched
one). Hidden test splits (labels -1) are predicted by each run's best checkpoint
(pifi_jax.train.predict) and written, keyed by the hub's idx, into <workdir>/submission.zip;
AX is predicted by the MNLI model. A suite over some of the tasks writes a partial archive (the
server refuses it, but its files can be checked).

`config.data.hub_path` reads a local snapshot of nyu-mll/glue instead of the hub
(`huggingface-cli download nyu-mll/glue --repo-type dataset --local-dir DIR`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import ml_collections

from pifi_jax.data import glue
from pifi_jax.train import loop
from pifi_jax.train.metrics import compute_metrics
from pifi_jax.train.predict import Predictor

SUBMISSION = "submission.zip"


def _task_config(config, task: str) -> ml_collections.ConfigDict:
    run_config = ml_collections.ConfigDict(config.to_dict())
    run_config.task = task
    return run_config


def run_suite(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    tasks: Sequence[str] = tuple(glue.SUITE),
    submission: bool = True,
    log=print,
) -> dict:
    """Trains (or finds finished) one run per task; returns {"rows": {task: {metric: value}},
    "table": markdown, "score": GLUE score or None, "submission": archive path or None}."""
    unknown = [name for name in tasks if name not in glue.SUITE]
    if unknown or not tasks:
        raise ValueError(
            f"GLUE tasks {unknown or list(tasks)}: choose among {', '.join(glue.SUITE)}"
        )
    workdir = Path(workdir)
    hub_path = str(config.data.get("hub_path", ""))
    rows: dict[str, dict[str, float]] = {}
    files: dict = {}
    for name in tasks:
        entry = glue.SUITE[name]
        run_dir = workdir / name
        results = loop.train_unless_finished(
            _task_config(config, entry.task), run_dir, entry.title, log
        )
        row = {k: v for k, v in results.items() if isinstance(v, (int, float))}
        needs_model = submission or name == "mnli"
        predictor = Predictor.from_workdir(run_dir) if needs_model else None
        if name == "mnli":
            matched = glue.load_labelled(predictor.task, "validation_matched", hub_path)
            outputs = predictor.outputs(matched.texts, progress=False)
            accuracy = compute_metrics(["accuracy"], outputs["predictions"], matched.labels)
            row["matched/accuracy"] = accuracy["accuracy"]
            row["mismatched/accuracy"] = results["test/accuracy"]
        rows[name] = row
        if submission:
            for file_name, texts, idx in glue.load_hidden(name, hub_path):
                predictions = predictor.outputs(texts, progress=False)["predictions"]
                suite_name = "ax" if file_name == "AX.tsv" else name
                files[file_name] = (idx, glue.submission_labels(suite_name, predictions))
                log(f"{entry.title}: {len(idx)} hidden test predictions for {file_name}")
    table = glue.format_table(rows)
    score = glue.glue_score(rows) if len(rows) == len(glue.SUITE) else None
    archive = None
    if submission:
        partial = len(files) < len(glue.SUBMISSION_FILES)
        archive = glue.write_submission(files, workdir / SUBMISSION, allow_partial=partial)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "glue.md").write_text(table, encoding="utf-8")
    summary = {
        "rows": rows,
        "score": score,
        "submission": None if archive is None else str(archive),
    }
    (workdir / "glue.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    log(table)
    if archive is not None:
        log(f"submission archive ({len(files)} files): {archive}")
    return {**summary, "table": table}


def default_workdir(config) -> str:
    """runs/glue_<model>_<method>: the PEFT method (or full) and the builder's model name."""
    model = Path(str(config.model.path).rstrip("/")).name.replace("asset:", "")
    method = config.peft.method
    if config.get("builder", "pretrained") != "pretrained":
        method = f"{config.builder}_{method}"
    return str(Path("runs") / f"glue_{model}_{method}")
