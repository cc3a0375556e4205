r"""Base vs PiFi over seeds and tasks, with a results table next to the paper's numbers.

    python -m launch.experiments --config=configs/pifi.py --config.train.epochs=1  # main job
    python -m launch.experiments --config=configs/pifi.py:slm=bert,llm=llama3.1 \
        --tasks=paper --seeds=2023,2024,2025 --out=runs/experiments_bert_llama3.1

The main job trains base and PiFi once each (seed 2023) on config.task, the offline Rotten
Tomatoes with MiniLM and SmolLM2's last layer, and prints their test accuracy side by side.
`--tasks=paper` is the paper's seven (sst2, imdb, tweet_eval_sentiment, tweet_eval_offensive,
cola, mnli, snli); any comma-separated list of registry tasks works.

Every run is a normal training run in <out>/<task>/<method>/seed<seed>; finished runs are skipped
and interrupted ones resume, so the same command completes an interrupted grid. Writes runs.csv,
summary.csv and summary.md (mean ± std over seeds; the paper's accuracies where it has them;
generation and QA tasks are scored by their own metrics).
"""

from absl import app, flags

from launch import common

_CONFIG = common.config_flag("configs/pifi.py", "PiFi run configuration.")
_TASKS = flags.DEFINE_list(
    "tasks", None, "Tasks, or 'paper' for the paper's seven (default: the config's task)."
)
_SEEDS = flags.DEFINE_list("seeds", ["2023"], "Seeds; each task and method runs once per seed.")
_METHODS = flags.DEFINE_list("methods", ["base", "pifi"], "Methods to compare.")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: runs/experiments_<...>).")


def main(argv):
    common.start(argv)
    from pifi_jax.pifi import experiments
    from pifi_jax.pifi.names import short_name

    config = _CONFIG.value
    slm, llm = short_name(str(config.model.path)), short_name(str(config.pifi.llm))
    name = f"{slm}_{llm}_L{config.pifi.layer}"
    out = _OUT.value or f"runs/experiments_{name}"
    tasks = _TASKS.value or [config.task]
    if tasks == ["paper"]:
        tasks = list(experiments.PAPER_TASKS)
    rows = experiments.run_grid(config, tasks, [int(s) for s in _SEEDS.value], out, _METHODS.value)
    table = experiments.summarize(rows, slm)
    path = experiments.write_reports(rows, table, out, f"{slm} vs {slm} + PiFi ({name})")
    print(path.read_text(encoding="utf-8"))
    print(f"tables: {path.parent.resolve()}")


if __name__ == "__main__":
    app.run(main)
