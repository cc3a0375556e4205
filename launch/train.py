r"""Train and evaluate a model from an ml_collections config.

    python -m launch.train --config=configs/classify.py[:ARGS] [--config.x.y=value ...] [--workdir=DIR]

Running the same command again resumes from the latest checkpoint in the workdir.
"""

from absl import app, flags

from launch import common

_CONFIG = common.config_flag("configs/classify.py", "Run configuration.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<task>_<model>).")


def main(argv):
    common.start(argv)
    config = _CONFIG.value
    from pifi_jax.parallel import initialize_distributed
    from pifi_jax.train import default_workdir, train_and_evaluate

    initialize_distributed(config.distributed)

    train_and_evaluate(config, _WORKDIR.value or default_workdir(config))


if __name__ == "__main__":
    app.run(main)
