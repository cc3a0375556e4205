r"""Bridge transfer (Jin et al., EMNLP 2023): LoRA learnt on a small model, carried to a large one
through a Fisher-pruned bridge, the large model never differentiated.

    python -m launch.transfer --config=configs/transfer.py[:slm=PATH,llm=PATH,task=NAME] \
        [--stage=all|slm|fisher|bridge|adapt|evaluate] [--workdir=DIR]

Stages (pifi_jax.bridge.procedure): slm (LoRA on the SLM), fisher (the LLM's Fisher importance,
layer by layer, and the depth map), bridge (the pruned checkpoint), adapt (W_plug fitted, then the
modules + W_plug + W_down trained through the bridge), evaluate (the modules plugged into the
LLM, scored, exported as a PEFT adapter). Running the command again skips finished stages and
resumes the trainer's. `--stage=study` adds the paper's comparison: LoRA on the LLM directly,
the modules plugged without the bridge, the bridge alone without SLM modules, and prints the
table. Several stages run one process each (--noisolate_stages: all in this one); transfer.json
records each one's peak host memory.
"""

from absl import app, flags

from launch import common

_CONFIG = common.config_flag("configs/transfer.py", "Transfer configuration.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/transfer_<task>).")
_STAGE = flags.DEFINE_string(
    "stage",
    "all",
    "all (the five stages), study (they and the comparison runs: llm_peft, direct, bridge_only),"
    " or one stage.",
)
_ISOLATE = flags.DEFINE_bool(
    "isolate_stages",
    True,
    "With more than one stage, run each in its own process: one process does not give a real"
    " pair's host memory back between stages.",
)


def main(argv):
    common.start(argv)
    from pifi_jax import data
    from pifi_jax.bridge import procedure

    config = _CONFIG.value
    named = {"all": procedure.STAGES, "study": procedure.STAGES + procedure.STUDY}
    stages = named.get(_STAGE.value, (_STAGE.value,))
    workdir = _WORKDIR.value or f"runs/transfer_{config.task}"
    isolate = _ISOLATE.value and len(stages) > 1
    results = procedure.run(config, workdir, stages, isolate=isolate)
    for stage, metrics in results.items():
        shown = ", ".join(f"{k} {float(v):.4f}" for k, v in sorted(metrics.items()))
        print(f"{stage}: {shown}")
    if _STAGE.value == "study":
        metric = data.task_for_config(config).primary_metric
        print(procedure.study_table(workdir, metric))


if __name__ == "__main__":
    app.run(main)
