"""Compiled memory of an IST / RST train step against plain LoRA at the same shapes (any machine).

    python benchmarks/ist_memory.py                      # the issue's Llama shape, float32
    python benchmarks/ist_memory.py --layers 4 --hidden 256 --ffn 704 --length 64   # smaller
    python benchmarks/ist_memory.py --remat full
    python benchmarks/ist_memory.py --time-rounds 5      # also step times, on random weights

A random Llama-shaped causal LM (default: 16 layers, hidden 1024, FFN 2816, 16 heads, vocab
32000), LoRA r 32 / alpha 64 on q, k, v, up and down, batch 8 x 256, is set up abstractly
(nothing is allocated: jax.ShapeDtypeStruct parameters and batch), and the project's train step
is lowered and compiled for four arms: plain LoRA (AdamW); IST and RST (4 of 16 layers trained
per step; the IST step plugin of pifi_jax.ist, its layer-masked AdamW, and its sparse gradients:
pifi_jax/ist/sparse_grad.py); and IST differentiating every layer (`ist.sparse_grad=False`,
the same updates: what the sparse gradients save). Reported per step: the
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

ARMS = ("lora", "ist", "rst", "ist_dense")
# What each arm is: (ist.mode, ist.sparse_grad).
_ARM_SETTINGS = {
    "lora": ("off", True),
    "ist": ("ist", True),
    "rst": ("rst", True),
    "ist_dense": ("ist", False),
}


def _run_config(arm: str, n_update: int, remat: str = "none"):
    import ml_collections

    from configs import classify

    config = classify.get_config()
    config.peft.method = "lora"
    config.ist.mode, config.ist.sparse_grad = _ARM_SETTINGS[arm]
    config.model.remat_policy = remat
    config.ist.n_update = n_update
    config.optim.weight_decay = 0.0
    config.optim.no_decay = ("bias$", "norm")
    return ml_collections.ConfigDict(config)


def lower(args, arm: str, materialize: bool = False) -> dict:
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
    run_config = _run_config(arm, args.n_update, args.remat)
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
    live = None
    if materialize:  # real random weights (the step's time does not depend on their values)
        real = module.init(key, ids, deterministic=True)["params"]
        trainable, frozen = partition.split_params(real, peft.trainable_rules(module, real))
        live = {
            "state": TrainState.create(trainable, frozen, optimizer, extra),
            "batch": {
                "input_ids": jax.random.randint(key, (args.batch, args.length), 0, args.vocab),
                "attention_mask": jnp.ones((args.batch, args.length), jnp.int32),
                "loss_mask": jnp.ones((args.batch, args.length), jnp.int32),
            },
            "step": compiled,
        }
    return {
        "live": live,
        "arguments": memory.argument_size_in_bytes,
        "temporaries": memory.temp_size_in_bytes,
        "outputs": memory.output_size_in_bytes,
        "total": memory.argument_size_in_bytes + memory.temp_size_in_bytes,
        "compile_s": seconds,
        "trainable": sum(x.size for x in jax.tree.leaves(trainable)),
    }


def _time_arms(results: dict, rounds: int) -> None:
    """Median step seconds of every arm (results[arm]["step_s"]), the arms taking turns."""
    import statistics

    import jax

    key = jax.random.PRNGKey(1)
    times = {arm: [] for arm in results}
    for round_ in range(rounds + 1):
        for arm, result in results.items():
            live = result["live"]
            start = time.perf_counter()
            live["state"], metrics = live["step"](live["state"], live["batch"], key)
            jax.block_until_ready(metrics)
            if round_ > 0:  # the first step of each arm is not timed
                times[arm].append(time.perf_counter() - start)
        print(f"[ist_memory] round {round_}/{rounds}", file=sys.stderr, flush=True)
    for arm, result in results.items():
        result["step_s"] = statistics.median(times[arm])
        result["live"] = None


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
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {ARMS}")
    parser.add_argument(
        "--time-rounds",
        type=int,
        default=0,
        help="also run the steps on random weights: this many timed rounds, the arms taking "
        "turns step by step after one untimed step each (0: memory only)",
    )
    args = parser.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown or "lora" not in arms:
        raise SystemExit(f"--arms: {unknown} not among {ARMS}, or 'lora' (the reference) missing")
    results = {}
    for arm in arms:
        print(f"[ist_memory] compiling {arm}", file=sys.stderr, flush=True)
        results[arm] = lower(args, arm, materialize=args.time_rounds > 0)
    if args.time_rounds > 0:
        _time_arms(results, args.time_rounds)
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
            *(
                [f"{r['step_s']:.3g}", f"{r['step_s'] / base['step_s']:.3f}"]
                if args.time_rounds > 0
                else []
            ),
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
                *(["median step s", "step / LoRA"] if args.time_rounds > 0 else []),
            ],
            rows,
            "lrrrrrrrrr",
        ),
    ]
    report = "\n".join(lines)
    print(report)
    return report


if __name__ == "__main__":
    main()
