"""kill -9 at random moments of a real run, then resume it to the end: does it end bitwise equal
to the same run left alone?

    python -m benchmarks.kill_resume [--kills=10] [--seed=0] [--root=/tmp/kill_resume]

Both runs are the offline default of configs/classify.py (the real all-MiniLM-L6-v2 on real
Rotten Tomatoes reviews), shortened: `--steps` optimizer steps on the first `--max_examples`
examples of each split, a checkpoint every `--checkpoint_every` steps, validation every
`--eval_every`. The reference runs uninterrupted; it gives the time to its first checkpoint
(start-up) and the time between checkpoints. The other run is started `--kills` times and each
start is sent SIGKILL (seeded choices): with probability `--training_share`, a delay drawn
within one checkpoint interval after that start's first new checkpoint (in the next steps, an
evaluation, or a save half-written), else a delay drawn within its start-up (loading,
compiling, restoring, the first steps: up to 0.9 times the last measured time from a launch to
its first new checkpoint, and never past that checkpoint); once the last checkpoint before the end is on disk only
start-up kills are drawn, so that every start is killed before the run is done. Then it is
started once more and left to finish. The final latest and best checkpoints of both runs are read with
pifi_jax.train.Checkpointer and compared leaf by leaf (params, optimizer state, step, rng), and
so are the two results.json (timings aside). The report (machine, versions, date, every kill:
its delay and the checkpoints on disk when it hit, and the verdict) is printed as markdown and
written to <root>/report.md; `--json` writes the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import environment, environment_lines, package_versions  # noqa: E402

# Results that measure wall-clock time, not the training outcome.
TIMING_KEYS = ("train_seconds", "steps_per_second")


def _command(workdir: Path, args) -> list[str]:
    return [
        sys.executable,
        "-m",
        "launch.train",
        "--config=configs/classify.py",
        f"--config.train.num_steps={args.steps}",
        f"--config.data.max_examples={args.max_examples}",
        f"--config.train.checkpoint_every_steps={args.checkpoint_every}",
        f"--config.train.eval_every_steps={args.eval_every}",
        "--config.train.progress_bar=False",
        f"--workdir={workdir}",
    ]


def _launch(workdir: Path, args, log: Path) -> subprocess.Popen:
    with open(log, "a", encoding="utf-8") as out:
        return subprocess.Popen(
            _command(workdir, args), cwd=REPO, stdout=out, stderr=subprocess.STDOUT
        )


def _on_disk(checkpoints: Path) -> tuple[list[int], int]:
    """(complete step directories, half-written ones) under a run's checkpoints/."""
    if not checkpoints.is_dir():
        return [], 0
    names = [p.name for p in checkpoints.iterdir()]
    done = sorted(int(n) for n in names if n.isdigit())
    return done, sum(".orbax-checkpoint-tmp" in n for n in names)


def _final(workdir: Path):
    """Host copies of the latest and best checkpoints' leaves, with their metas."""
    import jax
    import numpy as np

    from pifi_jax.train import Checkpointer

    def leaves(tree):
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}

    with Checkpointer(
        workdir / "checkpoints", best_metric="validation/accuracy", read_only=True
    ) as ckpt:
        state, meta = ckpt.restore(None)
        best, best_meta = ckpt.restore_best(None)
    return leaves(state), meta, leaves(best), best_meta


def _compare(reference: Path, resumed: Path) -> dict:
    import numpy as np

    state_a, meta_a, best_a, best_meta_a = _final(reference)
    state_b, meta_b, best_b, best_meta_b = _final(resumed)
    differing = [
        k for k in state_a if k not in state_b or not np.array_equal(state_a[k], state_b[k])
    ]
    differing += [
        f"best{k}" for k in best_a if k not in best_b or not np.array_equal(best_a[k], best_b[k])
    ]
    if state_a.keys() != state_b.keys() or best_a.keys() != best_b.keys():
        differing.append("(tree structure)")

    def outcome(workdir):
        results = json.loads((workdir / "results.json").read_text())
        return {k: v for k, v in results.items() if k not in TIMING_KEYS}

    return {
        "leaves": len(state_a) + len(best_a),
        "elements": int(sum(v.size for v in state_a.values())),
        "step": int(state_a["['step']"]),
        "differing_leaves": differing,
        "meta_equal": meta_a == meta_b and best_meta_a == best_meta_b,
        "results_equal": outcome(reference) == outcome(resumed),
        "equal": not differing
        and meta_a == meta_b
        and best_meta_a == best_meta_b
        and outcome(reference) == outcome(resumed),
    }


def run(args) -> dict:
    root = Path(args.root)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    reference, killed, log = root / "uninterrupted", root / "killed", root / "runs.log"

    started = time.monotonic()
    process = _launch(reference, args, log)
    first_checkpoint = None  # seconds from launch to the first complete checkpoint
    while process.poll() is None:
        if first_checkpoint is None and _on_disk(reference / "checkpoints")[0]:
            first_checkpoint = time.monotonic() - started
        time.sleep(0.05)
    if process.returncode != 0:
        raise SystemExit(f"the uninterrupted run failed; see {log}")
    reference_seconds = time.monotonic() - started
    # Seconds between checkpoints (training, evaluation and the save of checkpoint_every steps).
    saves = args.steps // args.checkpoint_every
    interval = (reference_seconds - first_checkpoint) / max(saves, 1)
    print(f"uninterrupted run: {reference_seconds:.1f} s", flush=True)

    chooser = random.Random(args.seed)
    kills = []
    # Seconds from a restart's launch to its first new checkpoint: the reference's (it compiled
    # everything) until a restart is measured (the compilation cache makes restarts faster).
    start_up = first_checkpoint
    last_save = args.steps - args.checkpoint_every  # a kill after it would hit evaluation only
    for number in range(1, args.kills + 1):
        done_before, _ = _on_disk(killed / "checkpoints")
        latest = max(done_before, default=0)
        launched = time.monotonic()
        process = _launch(killed, args, log)
        if latest < last_save and chooser.random() < args.training_share:
            # Mid-training: after this start's first new checkpoint, within the next interval
            # (the next steps, an evaluation, or the next save half-written).
            phase, delay = "training", chooser.uniform(0.0, interval)
            while max(_on_disk(killed / "checkpoints")[0], default=0) <= latest:
                if process.poll() is not None:
                    raise SystemExit(f"a restarted run ended before its kill; see {log}")
                time.sleep(0.02)
            start_up = time.monotonic() - launched
            time.sleep(delay)
        else:  # while it loads, compiles, restores or takes its first steps; a new checkpoint
            # ends the window (the kill then makes no progress, or one checkpoint at most)
            phase, delay = "start-up", chooser.uniform(0.0, 0.9 * start_up)
            deadline = launched + delay
            while time.monotonic() < deadline and process.poll() is None:
                if max(_on_disk(killed / "checkpoints")[0], default=0) > latest:
                    break
                time.sleep(0.02)
        done, partial = _on_disk(killed / "checkpoints")
        process.send_signal(signal.SIGKILL)
        if process.wait() != -signal.SIGKILL:
            if process.returncode != 0:
                raise SystemExit(f"restart {number} failed ({process.returncode}); see {log}")
            phase = "finished before the kill"
        kill = {
            "kill": number,
            "phase": phase,
            "at_s": round(time.monotonic() - launched, 2),
            "delay_s": round(delay, 2),
            "latest_before": latest or None,
            "checkpoints": done,
            "half_written": partial,
        }
        kills.append(kill)
        print(json.dumps(kill), flush=True)
        if phase == "finished before the kill":
            break

    resumed_started = time.monotonic()
    process = _launch(killed, args, log)
    if process.wait() != 0:
        raise SystemExit(f"the final resume failed; see {log}")
    comparison = _compare(reference, killed)
    return {
        "environment": environment(),
        "orbax": package_versions(("orbax-checkpoint", "tensorstore")),
        "command": " ".join(_command(Path("DIR"), args)[1:]),
        "seed": args.seed,
        "reference_seconds": round(reference_seconds, 1),
        "final_resume_seconds": round(time.monotonic() - resumed_started, 1),
        "kills": kills,
        "resumes_logged": (log.read_text(encoding="utf-8").count("resumed from")),
        **comparison,
    }


def markdown(report: dict) -> str:
    lines = ["## kill -9 and resume", ""]
    lines += environment_lines(report["environment"])
    extra = ", ".join(f"{k} {v}" for k, v in report["orbax"].items())
    lines += [f"- checkpoint stack: {extra}", f"- command: `python {report['command']}`", ""]
    training = sum(k["phase"] == "training" for k in report["kills"])
    lines.append(
        f"The uninterrupted run took {report['reference_seconds']} s. The other run was killed "
        f"{sum(k['phase'] != 'finished before the kill' for k in report['kills'])} times with SIGKILL (seed {report['seed']}): {training} times "
        "mid-training (a random delay within one checkpoint interval after that start's first "
        "new checkpoint: in the next steps, an evaluation or a half-written save), the others "
        "while starting up (loading, compiling, restoring, first steps); then it was started "
        f"once more and resumed to the end ({report['final_resume_seconds']} s). "
        f"{report['resumes_logged']} of the {len(report['kills']) + 1} starts resumed from a "
        "checkpoint."
    )
    lines += [
        "",
        "| kill | moment | killed after (s) | latest checkpoint at start | complete checkpoints "
        "when killed | half-written |",
        "|---:|---|---:|---:|---|---:|",
    ]
    for k in report["kills"]:
        moment = {
            "training": f"{k['delay_s']} s after this start's first new checkpoint",
            "start-up": "start-up / first steps",
        }.get(k["phase"], k["phase"])
        steps = ", ".join(map(str, k["checkpoints"])) or "none"
        lines.append(
            f"| {k['kill']} | {moment} | {k['at_s']} | {k['latest_before'] or 'none'} | {steps} "
            f"| {k['half_written']} |"
        )
    verdict = "bitwise equal" if report["equal"] else "NOT equal"
    lines += [
        "",
        f"Result: the final checkpoints are **{verdict}** to the uninterrupted run's: "
        f"{report['leaves']} leaves of the latest and best checkpoints ({report['elements']:,} "
        f"elements in the latest: params, optimizer state, step {report['step']}, rng), metas "
        f"{'equal' if report['meta_equal'] else 'different'}, results.json "
        f"{'equal' if report['results_equal'] else 'different'} (timings aside).",
    ]
    if report["differing_leaves"]:
        lines.append(f"Differing: {', '.join(report['differing_leaves'][:20])}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--max_examples", type=int, default=256)
    parser.add_argument("--checkpoint_every", type=int, default=2)
    parser.add_argument("--eval_every", type=int, default=4)
    parser.add_argument("--training_share", type=float, default=0.7)
    parser.add_argument("--root", default="/tmp/kill_resume")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    report = run(args)
    text = markdown(report)
    print(text)
    (Path(args.root) / "report.md").write_text(text, encoding="utf-8")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return 0 if report["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
