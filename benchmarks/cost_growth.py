"""How a train step's cost grows with sequence length and batch, pifi_jax vs PyTorch (CPU).

    python benchmarks/cost_growth.py                         # lengths 32..512, batches 1..64
    python benchmarks/cost_growth.py --lengths 32,64,128 --batches 1,8 --rounds 3
    python benchmarks/cost_growth.py --smoke --plot /tmp/g.png   # tiny shapes: a harness check

One encoder (MiniLM-L6-H384 at the offline asset's shape by default), one method (`--method`,
default full fine-tuning), float32: for each sequence length at a fixed batch (`--batch`,
default 8) and each batch at a fixed length (`--length`, default 128), pifi_jax's train step and
PyTorch eager's (benchmarks/cpu_speed.py builds both, as the benchmark suite does) take turns
for `--rounds` rounds after one untimed call each; the median step is reported, with tokens/s
and pifi_jax's compiled step memory (`memory_analysis()`: arguments + temporaries, the fair
measure on the CPU; PyTorch's CPU allocator keeps no such account). `--plot` draws step time
against length and against batch for both frameworks, and pifi_jax's step memory, in one figure
(log-log axes), so a user sees where each wins; the table goes to stdout and, with `--out`, to a
markdown file.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import common, cpu_speed  # noqa: E402


def ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def points(args) -> list[tuple[str, int, int]]:
    """(sweep, batch, length) of every measurement: the length sweep, then the batch sweep."""
    out = [("length", args.batch, n) for n in args.lengths]
    out += [("batch", b, args.length) for b in args.batches]
    return out


def measure(args) -> list[dict]:
    encoder = cpu_speed.encoder_shape(args.model, args.smoke)
    llm = cpu_speed.decoder_shape(args.smoke) if args.method == "pifi" else None
    peft = {"lora": cpu_speed.LORA, "ia3": cpu_speed.IA3}.get(args.method)
    rows = []
    for sweep, batch, length in points(args):
        case = common.Case(0, args.method, batch, length, encoder, llm, peft)
        print(f"[cost_growth] {sweep}: {case.label}", file=sys.stderr, flush=True)
        lines = {"pifi_jax": cpu_speed.jax_line(case, {}, args.smoke)}
        if not args.no_torch:
            lines["torch eager"] = cpu_speed.torch_line(case, "eager")
        result = cpu_speed.measure_row(case, lines, args.rounds)
        row = {"sweep": sweep, "batch": batch, "length": length}
        for name, r in result.items():
            row[name] = statistics.median(r["times"])
        row["jax_step_bytes"] = lines["pifi_jax"][2]["step_bytes"]
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        jax_s, torch_s = r["pifi_jax"], r.get("torch eager")
        tokens = r["batch"] * r["length"]
        out.append(
            [
                r["sweep"],
                f"{r['batch']} x {r['length']}",
                f"{jax_s * 1e3:.0f}",
                "-" if torch_s is None else f"{torch_s * 1e3:.0f}",
                f"{tokens / jax_s:,.0f}",
                "-" if torch_s is None else f"{tokens / torch_s:,.0f}",
                "-" if torch_s is None else f"{torch_s / jax_s:.2f}x",
                common.fmt_bytes(r["jax_step_bytes"]),
            ]
        )
    header = [
        "sweep",
        "batch x length",
        "pifi_jax ms",
        "torch eager ms",
        "pifi_jax tokens/s",
        "torch tokens/s",
        "pifi_jax speed / torch",
        "pifi_jax step memory",
    ]
    return common.markdown_table(header, out, "llrrrrrr")


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    def plain(ax, xs=None):
        """Log axes labelled with plain numbers: 1, 2, 5 of every decade (x: the measured
        points, when given)."""
        number = FuncFormatter(lambda v, _: f"{v:g}")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(number)
            axis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
            axis.set_minor_formatter(number)
        if xs:
            ax.set_xticks(xs)
            ax.xaxis.set_minor_formatter(NullFormatter())

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, sweep, key in ((axes[0], "length", "length"), (axes[1], "batch", "batch")):
        part = [r for r in rows if r["sweep"] == sweep]
        xs = [r[key] for r in part]
        ax.plot(xs, [r["pifi_jax"] * 1e3 for r in part], "o-", label="pifi_jax")
        if part and "torch eager" in part[0]:
            ax.plot(xs, [r["torch eager"] * 1e3 for r in part], "s--", label="torch eager")
        fixed = f"batch {part[0]['batch']}" if sweep == "length" else f"length {part[0]['length']}"
        ax.set(xscale="log", yscale="log", xlabel=key, ylabel="train step, ms")
        ax.set_title(f"step time vs {key} ({fixed})")
        plain(ax, xs)
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    ax = axes[2]
    for sweep, key, marker in (("length", "length", "o-"), ("batch", "batch", "s-")):
        part = [r for r in rows if r["sweep"] == sweep]
        ax.plot(
            [r["batch"] * r["length"] for r in part],
            [r["jax_step_bytes"] / 2**20 for r in part],
            marker,
            label=f"{key} sweep",
        )
    ax.set(xscale="log", yscale="log", xlabel="tokens per batch", ylabel="MiB")
    ax.set_title("pifi_jax compiled step memory")
    plain(ax)
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=cpu_speed.MODELS, default="minilm")
    parser.add_argument("--method", choices=cpu_speed.METHODS, default="full")
    parser.add_argument("--lengths", type=ints, default=ints("32,64,128,256,512"))
    parser.add_argument("--batch", type=int, default=8, help="the batch of the length sweep")
    parser.add_argument("--batches", type=ints, default=ints("1,2,4,8,16,32,64"))
    parser.add_argument("--length", type=int, default=128, help="the length of the batch sweep")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-torch", action="store_true", help="pifi_jax only")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (a harness check)")
    parser.add_argument("--plot", default=None, help="PNG file of the figure")
    parser.add_argument("--out", default=None, help="markdown file the section is appended to")
    args = parser.parse_args(argv)
    if args.smoke:
        args.lengths, args.batches, args.batch, args.length = [8, 16], [1, 2], 2, 16
    if args.rounds < 1 or not args.lengths or not args.batches:
        parser.error("--rounds must be >= 1 and the sweeps not empty")
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported (cpu_speed.py)
    rows = measure(args)
    title = f"{args.model} {args.method}, float32, CPU" + (" (smoke)" * args.smoke)
    lines = [
        f"### Cost growth: {title}",
        "",
        *common.environment_lines(common.environment()),
        f"- `python benchmarks/cost_growth.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- median of {args.rounds} interleaved steps after one untimed call each",
        "",
        table(rows),
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        common.publish(report, args.out)
    if args.plot:
        plot(rows, args.plot, title)
    return rows


if __name__ == "__main__":
    main()
