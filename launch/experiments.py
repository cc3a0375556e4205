r"""Base vs PiFi over seeds and tasks, with a results table next to the paper's numbers.

    python -m launch.experiments --config=configs/pifi.py:slm=bert,llm=llama3.1 \
        --tasks=sst2,imdb,tweet_eval_sentiment,tweet_eval_offensive,cola,mnli,snli \
        --seeds=2023,2024,2025 --out=runs/experiments_bert_llama3.1
    python -m launch.experiments --config=configs/pifi.py --tasks=rt --seeds=2023 \
        --config.train.epochs=1                      # the offline default (MiniLM + SmolLM2)

Every run is a normal training run in <out>/<task>/<method>/seed<seed>; finished runs are skipped
and interrupted ones resume, so the same command completes an interrupted grid. Writes runs.csv,
summary.csv and summary.md (mean ± std over seeds; the paper's accuracies where it has them).
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/pifi.py", "PiFi run configuration.", lock_config=True
)
_TASKS = flags.DEFINE_list("tasks", None, "Tasks (default: the paper's seven).")
_SEEDS = flags.DEFINE_list("seeds", ["2023"], "Seeds; each task and method runs once per seed.")
_METHODS = flags.DEFINE_list("methods", ["base", "pifi"], "Methods to compare.")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: runs/experiments_<...>).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from pifi_jax.pifi import experiments
    from pifi_jax.pifi.names import short_name

    config = _CONFIG.value
    slm, llm = short_name(str(config.model.path)), short_name(str(config.pifi.llm))
    name = f"{slm}_{llm}_L{config.pifi.layer}"
    out = _OUT.value or f"runs/experiments_{name}"
    tasks = _TASKS.value or list(experiments.PAPER_TASKS)
    rows = experiments.run_grid(config, tasks, [int(s) for s in _SEEDS.value], out, _METHODS.value)
    table = experiments.summarize(rows, slm)
    path = experiments.write_reports(rows, table, out, f"{slm} vs {slm} + PiFi ({name})")
    print(path.read_text(encoding="utf-8"))
    print(f"tables: {path.parent.resolve()}")


if __name__ == "__main__":
    app.run(main)
