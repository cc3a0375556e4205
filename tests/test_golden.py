"""Numerics drift made visible: the first training losses of README's offline default (real
MiniLM, real Rotten Tomatoes, seed 2023) for base, PiFi (the last layer of the real SmolLM2) and
LoRA, against the values recorded in tests/golden/offline_default.json.

Where this machine matches the recording (CPU model and vector features, jax, jaxlib, flax, optax
and numpy versions) the losses must be the same floats, bit for bit: XLA on the CPU is deterministic, so any change
of the computation, even one of rounding only, shows. Such changes are not harmless. Commit
24e7e74 (backward passes that keep only what they need: a softmax that keeps its output, an
activation that keeps its input) moved the second loss by 5e-7 and, 319 steps later, PiFi's test
accuracy on README's main job from 80.22% to 80.96%. Elsewhere (another CPU or library version,
whose kernels round differently: two VMs that both report "AMD EPYC", with the same libraries,
gave base's first loss as 0.69685304 (the recording at 6a13ced) and 0.69685310 (an AVX2 machine
without AVX-512, 2026-12-01), so the CPU's features count too) the losses must agree to `RTOL`, which a real change of the
computation (a GELU approximation, a dtype, a mask, an optimizer bug) exceeds.

When a change of the numerics is intended, re-record the losses and re-measure the figures in
README.md and docs/ that the change affects, noting the commit:

    python -m tests.test_golden --write
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).parent / "golden" / "offline_default.json"
STEPS = 4  # one epoch of the 128 training examples
RTOL = 1e-5
# The shortened offline default: configs/<file> with these overrides (the recorded run).
RUNS = {
    "base": ("configs/pifi.py:method=base", ()),
    "pifi": ("configs/pifi.py", ()),
    "lora": ("configs/classify.py", ("--config.peft.method=lora", "--config.seed=2023")),
}
SHORTENED = (
    f"--config.train.num_steps={STEPS}",
    "--config.data.max_examples=128",
    "--config.train.batch_size=32",
    "--config.train.compilation_cache=False",
)
VERSIONED = ("jax", "jaxlib", "flax", "optax", "numpy")


# CPU features XLA's CPU compiler targets (vector width, fused multiply-add): two machines that
# report the same model ("AMD EPYC" in a VM) but differ here round differently.
CPU_FEATURES = ("sse4", "avx", "fma", "f16c", "amx")


def machine() -> dict:
    """What decides the exact floats: the CPU model and features, and the numerical libraries."""
    import importlib.metadata

    cpu, features = platform.processor() or platform.machine(), ""
    try:
        info = dict(
            line.split(":", 1)
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if ":" in line
        )  # the last processor's lines; every core reports the same model and flags
        info = {key.strip(): value.strip() for key, value in info.items()}
        cpu = info.get("model name", cpu)
        flags = info.get("flags", "").split()
        features = " ".join(sorted(f for f in flags if f.startswith(CPU_FEATURES)))
    except OSError:
        pass
    versions = {name: importlib.metadata.version(name) for name in VERSIONED}
    return {"cpu": cpu, "cpu_features": features, **versions}


def losses(name: str, workdir: Path) -> list[float]:
    """The first STEPS training losses of one shortened offline-default run: the trainer's own
    setup and jitted step, fed as train_and_evaluate feeds them (no evaluation)."""
    import jax

    from pifi_jax.train import setup_run
    from pifi_jax.train.loop import _global
    from tests.conftest import load_config

    spec, extra = RUNS[name]
    config = load_config(spec, [*SHORTENED, *extra])
    run = setup_run(config, workdir, log=lambda *_: None)
    state = run.state
    rng = jax.device_put(jax.random.PRNGKey(config.seed), run.replicated)
    out = []
    for batch in run.train_batches.batches(0):
        state, metrics = run.train_step(state, _global(batch, run.batch_sharding), rng)
        out.append(float(metrics["loss"]))
        if len(out) == STEPS:
            break
    run.checkpointer.close()
    return out


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", sorted(RUNS))
def test_first_losses_of_the_offline_default(golden, name, tmp_path):
    recorded = golden["runs"][name]
    measured = losses(name, tmp_path / name)
    assert len(measured) == len(recorded) == STEPS
    if golden["machine"] == machine():
        # Same CPU and libraries: bit for bit (the module docstring says why).
        assert measured == recorded, (
            f"{name}: the losses moved on the machine they were recorded on "
            f"(commit {golden['commit']}): {measured} vs {recorded}. If the change of numerics "
            "is intended, re-record (python -m tests.test_golden --write) and re-measure "
            "README's and docs/' figures."
        )
    else:
        np.testing.assert_allclose(measured, recorded, rtol=RTOL, err_msg=name)


def _write() -> None:
    import tempfile

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: losses(name, Path(tmp) / name) for name in sorted(RUNS)}
    GOLDEN.parent.mkdir(exist_ok=True)
    record = {"commit": commit, "machine": machine(), "steps": STEPS, "runs": runs}
    GOLDEN.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {GOLDEN}: {json.dumps(runs)}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        raise SystemExit("usage: python -m tests.test_golden --write")
    _write()


def test_two_runs_of_one_config_end_bitwise_equal(tiny_bert_dir, tiny_task_files, tmp_path):
    """Same config, two run directories: the final parameters and optimizer state are the same
    bits (dropout on, so the rng streams are compared too), and so are the written metrics."""
    import jax

    from pifi_jax.train import Checkpointer, train_and_evaluate
    from tests.conftest import load_config, tiny_overrides

    overrides = [*tiny_overrides(tiny_bert_dir, tiny_task_files), "--config.train.num_steps=3"]
    states = []
    for name in ("a", "b"):
        train_and_evaluate(load_config("configs/classify.py:runlocal", overrides), tmp_path / name)
        with Checkpointer(tmp_path / name / "checkpoints") as ckpt:
            states.append(ckpt.restore(None)[0])
    first, second = (jax.tree.leaves(s) for s in states)
    assert jax.tree.structure(states[0]) == jax.tree.structure(states[1])
    assert len(first) > 10
    for x, y in zip(first, second, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    metrics = [(tmp_path / n / "metrics.jsonl").read_text().splitlines() for n in ("a", "b")]
    strip = [
        [{k: v for k, v in json.loads(x).items() if "seconds" not in k} for x in m] for m in metrics
    ]
    assert strip[0] == strip[1]
