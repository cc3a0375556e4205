"""Memory of bridge transfer's training steps against LoRA on the LLM itself (CPU, compiled).

    python benchmarks/bridge_memory.py --workdir runs/transfer_boolq [--batch 8 --length 128]

Needs a transfer run directory whose fisher, bridge and adapt stages have run (their files are
read: the bridge checkpoint and transfer_init.npz). Every arm is set up as the trainer sets it up
(`setup_run`, the transfer config's optimiser) and its train step compiled for one
[batch, length] batch: the figure is the compiled step's `memory_analysis()`, arguments +
temporaries (weights, optimiser state, activations), one arm at a time. Arms: LoRA on the SLM
(stage 1), the adaptation through the bridge (stage 4), LoRA on the LLM. Full fine-tuning of the
LLM is not set up here (its float32 weights, gradients and two Adam moments alone would not fit
this machine's memory); its row is the arithmetic of those four copies, marked as such.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args(argv)

    import jax
    import numpy as np
    from ml_collections import ConfigDict

    from benchmarks import common
    from pifi_jax.bridge import procedure
    from pifi_jax.hub.pretrained import open_checkpoint
    from pifi_jax.models import registry
    from pifi_jax.train.loop import setup_run

    workdir = Path(args.workdir)
    config = ConfigDict(json.loads((workdir / "slm" / "config.json").read_text()))
    with config.unlocked():
        config.data.buckets = (args.length,)
        config.data.max_length = args.length - config.data.max_target_length
        config.train.batch_size = args.batch
        config.data.max_examples = 4 * args.batch
    arms = {
        "LoRA on the SLM (stage 1)": config,
        "modules + W_plug + W_down through the bridge (stage 4)": procedure._stage_config(
            config,
            builder="bridge",
            **{
                "model.path": str(workdir / "bridge"),
                "model.tokenizer": str(workdir / "bridge"),
                "bridge.stage": "adapt",
                "bridge.init": str(workdir / "transfer_init.npz"),
            },
        ),
        "LoRA on the LLM": procedure._stage_config(
            config, **{"model.path": str(config.transfer.llm)}
        ),
    }
    memory, trainable = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, arm) in enumerate(arms.items()):
            print(f"[bridge_memory] {name}", file=sys.stderr, flush=True)
            run = setup_run(arm, Path(tmp) / str(i), log=lambda *a, **k: None)
            batch = next(iter(run.train_batches.batches(0)))
            batch = {k: np.asarray(v) for k, v in batch.items()}
            compiled = run.train_step.lower(run.state, batch, jax.random.PRNGKey(0)).compile()
            analysis = compiled.memory_analysis()
            memory[name] = analysis.argument_size_in_bytes + analysis.temp_size_in_bytes
            trainable[name] = run.trainable_params
            del run, compiled
            gc.collect()
    _, hf = open_checkpoint(str(config.transfer.llm))
    llm_params = sum(int(np.prod(s.shape)) for s in _abstract(registry, hf).values())
    full = 4 * 4 * llm_params
    reference = memory["LoRA on the LLM"]
    gib = 2.0**30
    print("### Bridge transfer: step memory per training stage (CPU, compiled)\n")
    print("\n".join(common.environment_lines(common.environment())))
    print(f"- command: `python benchmarks/bridge_memory.py {' '.join(argv or sys.argv[1:])}`")
    print(
        f"- one train step of batch {args.batch} x {args.length} tokens, float32, the transfer "
        f"config's AdamW; `memory_analysis()` arguments + temporaries; run directory {workdir}\n"
    )
    rows = [
        [
            name,
            f"{trainable[name]:,}",
            f"{memory[name] / gib:.2f}",
            f"{reference / memory[name]:.2f}x",
            f"{full / memory[name]:.2f}x",
        ]
        for name in memory
    ]
    rows.append(
        [
            "full fine-tuning of the LLM (weights + gradients + 2 Adam moments, arithmetic)",
            f"{llm_params:,}",
            f">= {full / gib:.2f}",
            "-",
            "1.00x",
        ]
    )
    print(
        common.markdown_table(
            [
                "training",
                "trainable params",
                "step memory GiB",
                "LLM LoRA / this",
                "full FT / this",
            ],
            rows,
            "lrrrr",
        )
    )


def _abstract(registry, hf):
    import jax.numpy as jnp

    from pifi_jax.hub.pretrained import abstract_params

    config = registry.config_from_hf(hf)
    family = registry.family_for(config.model_type)
    return abstract_params(family.build(config, "causal_lm", 0, jnp.float32, jnp.float32))


if __name__ == "__main__":
    main()
