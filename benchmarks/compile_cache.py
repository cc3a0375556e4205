"""What the persistent compilation cache saves: README's plain fine-tuning command, shortened, run
twice in fresh processes that share one cache directory.

    python benchmarks/compile_cache.py                    # appends a section to docs/benchmarks.md
    python benchmarks/compile_cache.py --out=-            # print only
    python benchmarks/compile_cache.py --library-default  # the cache the trainer turns on itself
    python benchmarks/compile_cache.py --no-baseline      # skip the run without any cache

The command is `python -m launch.train --config=configs/classify.py` (real MiniLM, real Rotten
Tomatoes, offline) with `--config.train.num_steps` and `--config.data.max_examples` lowered. Each
run is a child python that runs launch.train as `python -m` would, with
`pifi_jax.train.compile_cache`'s counters listening, and writes what they saw to a JSON file; the
launcher and the library print nothing new. Runs, all with their own run directory under one
`runs/` (so none of them resumes another):

- `no cache` (unless --no-baseline): JAX_ENABLE_COMPILATION_CACHE=false, nothing read or written;
- `cold`: an empty cache directory, every executable compiled and written;
- `warm`: the same cache directory, a fresh run directory beside the first: it trains again.

Where the cache is: by default the benchmark sets it itself through JAX's environment variables
(JAX_COMPILATION_CACHE_DIR=runs/.jax_cache, no minimum compile time or size), which
`compile_cache.enable` keeps as the user's choice. With --library-default it sets nothing, and
measures the trainer's own default (`config.train.compilation_cache`: `runs/.jax_cache`, beside
the run directories); if the cold run leaves that directory empty the report says the default is
not in effect and the command exits with status 1.

Reported per run: wall time of the child process, seconds of XLA compilation (executables
compiled) and of loading executables from the cache (hits), seconds of tracing and lowering to
MLIR (which no cache saves), the counts of compiled / loaded / missed / written executables, the
entries in the cache directory, and the test accuracy (the same in every run: the cache changes
no number).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import common  # noqa: E402

DEFAULT_OUT = REPO / "docs" / "benchmarks.md"

# The child: compile_cache's counters (imported first, so they see every compilation), its own
# listener for tracing and lowering, then launch.train as `python -m launch.train ARGS` runs it.
_WRAPPER = textwrap.dedent(
    """
    import json, runpy, sys, time
    started = time.perf_counter()
    from jax import monitoring
    from pifi_jax.train import compile_cache
    out_path, sys.argv = sys.argv[1], ["launch.train", *sys.argv[2:]]
    traced = {"seconds": 0.0}
    TRACE = ("/jax/core/compile/jaxpr_trace_duration",
             "/jax/core/compile/jaxpr_to_mlir_module_duration")
    def on_duration(event, duration, **_):
        if event in TRACE:
            traced["seconds"] += duration
    monitoring.register_event_duration_secs_listener(on_duration)
    status = 0
    try:
        runpy.run_module("launch.train", run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        status = stop.code or 0
    record = compile_cache.stats().as_dict()
    record.update(trace_seconds=traced["seconds"], child_seconds=time.perf_counter() - started,
                  cache_dir=str(compile_cache.active_dir()), status=status)
    with open(out_path, "w") as f:
        json.dump(record, f)
    sys.exit(status)
    """
)

_COUNTS = ("compiled", "hits", "misses", "written")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/classify.py", help="--config of launch.train")
    parser.add_argument("--steps", type=int, default=4, help="--config.train.num_steps")
    parser.add_argument("--max-examples", type=int, default=128, help="--config.data.max_examples")
    parser.add_argument(
        "--library-default",
        action="store_true",
        help="measure the trainer's own cache (set no JAX cache variable)",
    )
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the run with the cache switched off"
    )
    parser.add_argument("--workdir", default="", help="where runs/ goes (default: a temp dir)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="markdown file to append to; -")
    return parser.parse_args(argv)


def train_command(args: argparse.Namespace, workdir: Path) -> list[str]:
    """README's plain fine-tuning command, shortened, for one run directory."""
    return [
        sys.executable,
        "-m",
        "launch.train",
        f"--config={args.config}",
        f"--config.train.num_steps={args.steps}",
        f"--config.data.max_examples={args.max_examples}",
        f"--workdir={workdir}",
    ]


def _entries(directory: Path) -> int:
    return sum(1 for p in directory.glob("*-cache")) if directory.is_dir() else 0


def run_once(args, name: str, runs: Path, cache_dir: Path, enabled: bool) -> dict:
    """One child run; its counters, wall time, cache entries and test accuracy."""
    workdir = runs / name.replace(" ", "_")
    stats_path = runs / f"{workdir.name}.stats.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    for key in ("JAX_COMPILATION_CACHE_DIR", "JAX_ENABLE_COMPILATION_CACHE"):
        env.pop(key, None)
    if not enabled:
        env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    elif not args.library_default:
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
    command = train_command(args, workdir)
    child = [sys.executable, "-c", _WRAPPER, str(stats_path), *command[3:]]
    log = runs / f"{workdir.name}.log"
    load_before = os.getloadavg()[0]  # other jobs on the machine slow every figure alike
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        done = subprocess.run(child, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        tail = log.read_text(encoding="utf-8")[-3000:]
        raise RuntimeError(f"run {name!r} failed ({done.returncode}):\n{tail}")
    record = json.loads(stats_path.read_text(encoding="utf-8"))
    results = json.loads((workdir / "results.json").read_text(encoding="utf-8"))
    record.update(
        name=name,
        wall_seconds=wall,
        load_before=load_before,
        entries=_entries(cache_dir),
        test_accuracy=results.get("test/accuracy"),
    )
    print(
        f"{name}: {wall:.1f} s, compiled {record['compiled']} ({record['compile_seconds']:.1f} s),"
        f" loaded {record['hits']}, entries {record['entries']}",
        flush=True,
    )
    return record


def report(runs: list[dict], env: dict, command: list[str], note: str = "") -> str:
    """The markdown section of a measurement."""
    load = ", ".join(f"{r['name']} {r['load_before']:.1f}" for r in runs if "load_before" in r)
    header = [
        "run",
        "wall s",
        "XLA compile s",
        "cache load s",
        "trace + lower s",
        "compiled",
        "loaded (hits)",
        "misses",
        "written",
        "cache entries",
        "test accuracy",
    ]
    rows = []
    for r in runs:
        accuracy = r.get("test_accuracy")
        rows.append(
            [
                r["name"],
                f"{r['wall_seconds']:.1f}",
                f"{r['compile_seconds']:.1f}",
                f"{r['load_seconds']:.2f}",
                f"{r.get('trace_seconds', 0.0):.1f}",
                *(str(r[k]) for k in _COUNTS),
                str(r["entries"]),
                "-" if accuracy is None else f"{accuracy:.4f}",
            ]
        )
    by_name = {r["name"]: r for r in runs}
    lines = [
        f"## Persistent compilation cache: a second run of the same command ({env['date'][:10]})",
        "",
        *common.environment_lines(env),
        "- command (each run its own `--workdir` under one `runs/`): `" + " ".join(command) + "`",
    ]
    if note:
        lines.append(f"- cache: {note}")
    if load:
        lines.append(f"- load average (1 min) before each run: {load}")
    lines += ["", common.markdown_table(header, rows, "l" + "r" * (len(header) - 1)), ""]
    if "cold" in by_name and "warm" in by_name:
        cold, warm = by_name["cold"], by_name["warm"]
        saved = cold["compile_seconds"] - warm["compile_seconds"] - warm["load_seconds"]
        lines.append(
            f"The warm run took {warm['wall_seconds'] / cold['wall_seconds']:.2f}x the cold "
            f"run's wall time ({warm['wall_seconds']:.1f} vs {cold['wall_seconds']:.1f} s): it "
            f"loaded {warm['hits']} executables and compiled {warm['compiled']} "
            f"({warm['misses']} misses), saving {saved:.1f} s of XLA compilation."
        )
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    base = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="cc_bench_"))
    runs = base / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    cache_dir = runs / ".jax_cache"  # = compile_cache.cache_dir_for(runs / NAME)
    if _entries(cache_dir):
        raise SystemExit(f"{cache_dir} is not empty: use a fresh --workdir")
    env = common.environment()
    plan = [] if args.no_baseline else [("no cache", False)]
    plan += [("cold", True), ("warm", True)]
    records = [run_once(args, name, runs, cache_dir, enabled) for name, enabled in plan]
    if args.library_default:
        note = "the trainer's default (`config.train.compilation_cache`), no JAX cache variable set"
    else:
        note = (
            "set by the benchmark: JAX_COMPILATION_CACHE_DIR=runs/.jax_cache, "
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0, JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=-1"
        )
    wired = _entries(cache_dir) > 0
    if not wired:
        note += f"; **the cold run left {cache_dir.name} empty: no cache was in effect**"
    command = ["python"] + train_command(args, Path("runs/NAME"))[1:]
    text = report(records, env, command, note)
    print(text)
    if args.out != "-":
        out = Path(args.out)
        before = out.read_text(encoding="utf-8") if out.exists() else ""
        with open(out, "a", encoding="utf-8") as f:
            f.write(("" if not before or before.endswith("\n\n") else "\n") + text)
    return {"runs": records, "markdown": text, "wired": wired}


if __name__ == "__main__":
    sys.exit(0 if main()["wired"] else 1)
