r"""Train and evaluate a model from an ml_collections config.

    python -m launch.train --config=configs/classify.py[:ARGS] [--config.x.y=value ...] [--workdir=DIR]

Running the same command again resumes from the latest checkpoint in the workdir.
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/classify.py", "Run configuration.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<task>_<model>).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    from pifi_jax.parallel import initialize_distributed
    from pifi_jax.train import default_workdir, train_and_evaluate

    initialize_distributed(config.distributed)

    train_and_evaluate(config, _WORKDIR.value or default_workdir(config))


if __name__ == "__main__":
    app.run(main)
