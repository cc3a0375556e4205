"""Compiled memory of an IST / RST train step against plain LoRA at the same shapes (any machine).

    python benchmarks/ist_memory.py                      # the issue's Llama shape, float32
    python benchmarks/ist_memory.py --layers 4 --hidden 256 --ffn 704 --length 64   # smaller
    python benchmarks/ist_memory.py --remat full

A random Llama-shaped causal LM (default: 16 layers, hidden 1024, FFN 2816, 16 heads, vocab
32000), LoRA r 32 / alpha 64 on q, k, v, up and down, batch 8 x 256, is set up abstractly
(nothing is allocated: jax.ShapeDtypeStruct parameters and batch), and the project's train step
is lowered and compiled three times: plain LoRA (AdamW), IST and RST (4 of 16 layers trained per
step; the IST step plugin of pifi_jax.ist, its layer-masked AdamW). Reported per step: the
compiled `memory_analysis()` (arguments, temporaries, outputs, and temporaries + arguments), as
ratios to plain LoRA. The frozen weights are arguments of every step alike.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import common  # noqa: E402

ARMS = ("lora", "ist", "rst")


def _run_config(arm: str, n_update: int):
    import ml_collections

    from configs import classify

    config = classify.get_config()
    config.peft.method = "lora"
    config.ist.mode = "off" if arm == "lora" else arm
    config.ist.n_update = n_update
    config.optim.weight_decay = 0.0
    config.optim.no_decay = ("bias$", "norm")
    return ml_collections.ConfigDict(config)


def lower(args, arm: str) -> dict:
    import jax
    import jax.numpy as jnp

    from pifi_jax import peft
    from pifi_jax.ist import make_ist_plugin
    from pifi_jax.models import registry
    from pifi_jax.train import optim, partition
    from pifi_jax.train.objectives import CausalLM
    from pifi_jax.train.step import TrainState, make_train_step

    hf = {
        "model_type": "llama",
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "intermediate_size": args.ffn,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.heads,
        "max_position_embeddings": max(2048, args.length),
        "tie_word_embeddings": False,
    }
    config = registry.config_from_hf(hf)
    module = registry.family_for("llama").build(config, "causal_lm", 0, jnp.float32, jnp.float32)
    if args.remat != "none":
        module = module.clone(remat_policy=args.remat)
    lora = peft.LoraConfig(
        r=args.r,
        lora_alpha=2 * args.r,
        target_modules=("q_proj", "k_proj", "v_proj", "up_proj", "down_proj"),
    )
    ids = jnp.zeros((1, 8), jnp.int32)

    def init_of(m):
        return lambda key: m.init(key, ids, deterministic=True)["params"]

    key = jax.random.PRNGKey(0)
    base_shapes = partition.flatten(jax.eval_shape(init_of(module), key))
    module = peft.PeftModel(module, peft.make_plan(lora, module.config, base_shapes), lora)
    params = jax.eval_shape(init_of(module), key)
    trainable, frozen = partition.split_params(params, peft.trainable_rules(module, params))
    objective = CausalLM(module, tokenizer=None)
    run_config = _run_config(arm, args.n_update)
    plugin = make_ist_plugin(run_config, objective, trainable, lambda *_: None)
    make_optimizer = optim.make_optimizer if plugin is None else plugin.make_optimizer
    optimizer = make_optimizer(run_config.optim, trainable, 100)
    extra = None if plugin is None else plugin.extra
    state = jax.eval_shape(
        lambda t, f: TrainState.create(t, f, optimizer, extra), trainable, frozen
    )
    batch = {
        name: jax.ShapeDtypeStruct((args.batch, args.length), jnp.int32)
        for name in ("input_ids", "attention_mask", "loss_mask")
    }
    step = make_train_step(objective, optimizer, plugin=plugin)
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, batch, key).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    return {
        "arguments": memory.argument_size_in_bytes,
        "temporaries": memory.temp_size_in_bytes,
        "outputs": memory.output_size_in_bytes,
        "total": memory.argument_size_in_bytes + memory.temp_size_in_bytes,
        "compile_s": seconds,
        "trainable": sum(x.size for x in jax.tree.leaves(trainable)),
    }


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--r", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--n-update", type=int, default=4)
    parser.add_argument("--remat", default="none", help="none | full | dots | dots_no_batch")
    args = parser.parse_args(argv)
    results = {}
    for arm in ARMS:
        print(f"[ist_memory] compiling {arm}", file=sys.stderr, flush=True)
        results[arm] = lower(args, arm)
    base = results["lora"]
    rows = [
        [
            arm,
            f"{r['trainable']:,}",
            common.fmt_bytes(r["arguments"]),
            common.fmt_bytes(r["temporaries"]),
            common.fmt_bytes(r["total"]),
            f"{r['total'] / base['total']:.3f}",
            f"{r['temporaries'] / base['temporaries']:.3f}",
            f"{r['compile_s']:.0f}",
        ]
        for arm, r in results.items()
    ]
    lines = [
        f"### IST step memory vs plain LoRA: Llama shape {args.layers} layers x {args.hidden} "
        f"(FFN {args.ffn}), batch {args.batch} x {args.length}, LoRA r {args.r} on q,k,v,up,down, "
        f"{args.n_update} of {args.layers} layers per step, remat {args.remat}",
        "",
        *common.environment_lines(common.environment()),
        "- compiled `memory_analysis()` of the jitted, donated train step (float32), lowered on "
        "abstract values; total = arguments + temporaries",
        "",
        common.markdown_table(
            [
                "step",
                "trainable params",
                "arguments",
                "temporaries",
                "total",
                "total / LoRA",
                "temporaries / LoRA",
                "compile s",
            ],
            rows,
            "lrrrrrrr",
        ),
    ]
    report = "\n".join(lines)
    print(report)
    return report


if __name__ == "__main__":
    main()
