r"""Train one run per value of a config key; write sweep.csv and sweep.png (accuracy vs trainable
parameters).

    python -m launch.sweep --config=configs/classify.py --config.peft.method=lora \
        --sweep=peft.r,peft.lora_alpha=1,2,4,8,16 --workdir=runs/lora_sweep

`--sweep=KEY[,KEY...]=V1,V2,...` sets every KEY to each value in turn. Re-running the command skips
finished runs and resumes an interrupted one.
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/classify.py", "Base configuration.", lock_config=True
)
_SWEEP = flags.DEFINE_string("sweep", None, "KEY[,KEY...]=V1,V2,...", required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the sweep.", required=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    keys, sep, values = _SWEEP.value.partition("=")
    if not sep or not values:
        raise app.UsageError(f"--sweep must look like KEY=V1,V2,...; got {_SWEEP.value!r}")
    from pifi_jax.train.sweep import run_sweep

    rows = run_sweep(_CONFIG.value, keys.split(","), values.split(","), _WORKDIR.value)
    for row in rows:
        print(
            {
                k: v
                for k, v in row.items()
                if k.startswith(("validation/", "trainable")) or k == keys
            }
        )


if __name__ == "__main__":
    app.run(main)
