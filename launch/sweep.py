r"""Train one run per value of a config key; write sweep.csv and sweep.png (accuracy vs trainable
parameters).

    python -m launch.sweep --config=configs/classify.py --config.peft.method=lora \
        --sweep=peft.r,peft.lora_alpha=1,2,4,8,16 --workdir=runs/lora_sweep

`--sweep=KEY[,KEY...]=V1,V2,...` sets every KEY to each value in turn. Re-running the command skips
finished runs and resumes an interrupted one.

Finished sweeps plotted together (no training), e.g. LoRA ranks next to adapter sizes:

    python -m launch.sweep --combine=runs/lora_sweep,runs/adapter_sweep --names=LoRA,adapters \
        --plot=docs/peft_sweep.png
"""

from absl import app, flags

from launch import common

_CONFIG = common.config_flag("configs/classify.py", "Base configuration.")
_SWEEP = flags.DEFINE_string("sweep", None, "KEY[,KEY...]=V1,V2,...")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the sweep.")
_COMBINE = flags.DEFINE_list("combine", None, "Finished sweep directories to plot together.")
_NAMES = flags.DEFINE_list("names", None, "With --combine: a legend name per directory.")
_PLOT = flags.DEFINE_string("plot", None, "With --combine: the PNG to write.")


def main(argv):
    common.start(argv)
    if _COMBINE.value:
        from pifi_jax.train.sweep import plot_sweeps

        if not _PLOT.value:
            raise app.UsageError("--combine needs --plot=PATH.png")
        plot_sweeps(_COMBINE.value, _PLOT.value, _NAMES.value)
        print(f"plot: {_PLOT.value}")
        return
    if not _SWEEP.value or not _WORKDIR.value:
        raise app.UsageError("--sweep and --workdir are required (or --combine and --plot)")
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
