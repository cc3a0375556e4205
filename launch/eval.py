r"""Evaluate the best checkpoint of a run on its validation and test splits.

    python -m launch.eval --config=configs/classify.py[:ARGS] [--config.x.y=value ...] --workdir=DIR

Use the same config and overrides as the training command; results go to DIR/eval.json.
"""

import json
import os

from absl import app, flags

from launch import common

_CONFIG = common.config_flag("configs/classify.py", "Run configuration.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<task>_<model>).")


def main(argv):
    common.start(argv)
    from pifi_jax.train import default_workdir, evaluate_run

    config = _CONFIG.value
    workdir = _WORKDIR.value or default_workdir(config)
    results = evaluate_run(config, workdir)
    with open(os.path.join(workdir, "eval.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    app.run(main)
