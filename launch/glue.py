r"""Fine-tune one config on the nine GLUE tasks: the table, and a gluebenchmark.com submission.

    python -m launch.glue --config=configs/classify.py:model=bert-base-uncased \
        --config.peft.method=lora [--tasks=cola,sst2,...] [--submission=False] [--workdir=DIR]
    # a local snapshot of the hub data instead of the hub:
    python -m launch.glue --config=configs/classify.py --config.data.hub_path=glue_snapshot

Each task is a run in DIR/<task> (default DIR: runs/glue_<model>_<method>); finished runs are
kept, so the same command resumes. DIR gets glue.md (the table), glue.json and submission.zip
(pifi_jax/train/glue_suite.py).
"""

from absl import app, flags

from launch import common

_CONFIG = common.config_flag("configs/classify.py", "Run configuration (every task's).")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Suite directory (default: runs/glue_<model>_<method>)."
)
_TASKS = flags.DEFINE_list("tasks", None, "GLUE tasks to run (default: all nine).")
_SUBMISSION = flags.DEFINE_bool("submission", True, "Predict the hidden test splits and zip them.")


def main(argv):
    common.start(argv)
    from pifi_jax.data import glue
    from pifi_jax.parallel import initialize_distributed
    from pifi_jax.train import glue_suite

    config = _CONFIG.value
    initialize_distributed(config.distributed)
    glue_suite.run_suite(
        config,
        _WORKDIR.value or glue_suite.default_workdir(config),
        tasks=tuple(_TASKS.value or glue.SUITE),
        submission=_SUBMISSION.value,
    )


if __name__ == "__main__":
    app.run(main)
