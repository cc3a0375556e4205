r"""Score every layer of an LLM on a task's training data and pick the one to plug in (PiFi).

    python -m launch.select_layer --config=configs/pifi.py:task=rt,llm=smollm2 [--out=DIR]
    python -m launch.select_layer --config=configs/pifi.py:task=sst2,llm=llama3.1 \
        --config.pifi.selection=corr --config.pifi.selection_samples=400

Reads the config's data settings and `pifi.selection*` options (see pifi_jax.pifi.select), prints
the per-layer table and writes table.txt, scores.csv and scores.png to --out (default:
runs/select_<task>_<llm>). Train with the result: --config.pifi.layer=<chosen>, or let training
select by itself with --config.pifi.layer=auto.
"""

from absl import app, flags

from launch import common

_CONFIG = common.config_flag("configs/pifi.py", "PiFi run configuration.")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: runs/select_<task>_<llm>).")


def main(argv):
    common.start(argv)
    from pathlib import Path

    from pifi_jax import data
    from pifi_jax.pifi.names import short_name
    from pifi_jax.pifi.run import select_for_config

    config = _CONFIG.value
    out = Path(_OUT.value or f"runs/select_{config.task}_{short_name(str(config.pifi.llm))}")
    scores = select_for_config(config, data.task_for_config(config), out)
    print(f"chosen layer {scores.chosen}; table, CSV and plot in {out.resolve()}")


if __name__ == "__main__":
    app.run(main)
