"""pifi_jax.train.compile_cache (the persistent compilation cache and its counters), the
accelerator extras of setup.py, and the report code of benchmarks/compile_cache.py.

JAX reads its cache settings once per process, so every check that turns the cache on runs in a
fresh child python; this process's jax config is never touched.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import REPO, subprocess_env

# A child python: `enable` per its mode, then two small jitted functions, and a JSON line of
# what enable returned and what the counters saw.
_CHILD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import jax
    import jax.numpy as jnp

    from pifi_jax.train import compile_cache

    mode, dirs = sys.argv[1], sys.argv[2:]
    x = jnp.arange(12.0).reshape(3, 4)  # compiled before enable: never cached
    out = {"enabled": str(compile_cache.enable(dirs[0]))}
    if mode == "move":
        out["again"] = str(compile_cache.enable(dirs[0]))  # same directory: nothing changes
    with compile_cache.counting() as seen:
        jax.jit(lambda a: jnp.tanh(a @ a.T) + 1.0)(x).block_until_ready()
        jax.jit(lambda a: (a * 3.0).sum(axis=0))(x).block_until_ready()
    out["first"] = seen.as_dict()
    if mode == "move":
        out["moved"] = str(compile_cache.enable(dirs[1]))
        with compile_cache.counting() as seen:
            jax.jit(lambda a: jnp.cos(a).max())(x).block_until_ready()
        out["second"] = seen.as_dict()
    out["totals"] = compile_cache.stats().as_dict()
    out["active"] = str(compile_cache.active_dir())
    print("RESULT " + json.dumps(out))
    """
)


def _child(mode: str, *dirs: Path, env_extra: dict | None = None) -> dict:
    env = subprocess_env(1)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env.update(env_extra or {})
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, *map(str, dirs)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def _entries(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if p.name.endswith("-cache")}


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
    cache = tmp_path / "runs" / ".jax_cache"  # does not exist yet: enable creates it
    first = _child("plain", cache)
    assert first["enabled"] == str(cache.resolve()) == first["active"]
    assert first["first"]["misses"] == first["first"]["compiled"] == 2
    assert first["first"]["hits"] == 0 and first["first"]["written"] == 2
    assert first["first"]["compile_seconds"] > 0
    written = _entries(cache)
    assert len(written) >= 2

    second = _child("plain", cache)
    assert second["first"]["hits"] == 2 and second["first"]["load_seconds"] > 0
    assert second["first"]["misses"] == second["first"]["compiled"] == 0
    # The process's only compilations came before enable (the array set-up): no misses.
    assert second["totals"]["misses"] == second["totals"]["written"] == 0
    assert second["totals"]["compiled"] == first["totals"]["compiled"] - 2
    assert _entries(cache) == written


def test_enable_twice_is_a_no_op_and_another_directory_moves_the_cache(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    out = _child("move", a, b)
    assert out["enabled"] == out["again"] == str(a.resolve())
    assert out["moved"] == str(b.resolve()) == out["active"]
    assert out["first"]["written"] == 2 and out["second"]["written"] == 1
    # The entry compiled after the move is in b alone (without reset_cache it would land in a).
    assert len(_entries(b)) == 1
    assert not _entries(a) & _entries(b)


def test_a_cache_the_user_chose_is_kept(tmp_path):
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    out = _child("plain", ours, env_extra={"JAX_COMPILATION_CACHE_DIR": str(theirs)})
    assert out["enabled"] == out["active"] == str(theirs)
    assert not ours.exists()
    # Their thresholds too: JAX's default skips executables compiled in under a second.
    assert out["first"]["misses"] == 2 and out["first"]["written"] == 0


def test_a_cache_switched_off_stays_off(tmp_path):
    out = _child("plain", tmp_path / "c", env_extra={"JAX_ENABLE_COMPILATION_CACHE": "false"})
    assert out["enabled"] == out["active"] == "None"
    assert out["first"]["compiled"] == 2 and out["first"]["misses"] == 0
    assert not (tmp_path / "c").exists()


def test_cache_dir_for_is_beside_the_run_directory(tmp_path, monkeypatch):
    from pifi_jax.train import compile_cache

    monkeypatch.chdir(tmp_path)
    assert compile_cache.cache_dir_for("runs/rt_minilm") == tmp_path / "runs" / ".jax_cache"
    assert compile_cache.cache_dir_for(tmp_path / "x" / "run") == tmp_path / "x" / ".jax_cache"


def test_counting_sees_compilations_in_this_process():
    import jax
    import jax.numpy as jnp

    from pifi_jax.train import compile_cache

    before = compile_cache.stats()
    with compile_cache.counting() as seen:
        jax.jit(lambda a: jnp.sinh(a) * 7.25)(jnp.ones((5, 3))).block_until_ready()
    assert seen.compiled + seen.hits >= 1
    assert (compile_cache.stats() - before).compiled >= seen.compiled
    assert seen.as_dict().keys() == {
        "hits",
        "misses",
        "compiled",
        "written",
        "compile_seconds",
        "load_seconds",
    }


def _setup_call() -> ast.Call:
    tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup"
    ]
    assert len(calls) == 1
    return calls[0]


def test_setup_declares_the_accelerator_extras():
    keywords = {kw.arg: kw.value for kw in _setup_call().keywords}
    install = ast.literal_eval(keywords["install_requires"])
    extras = ast.literal_eval(keywords["extras_require"])
    (jax_floor,) = [req for req in install if req.startswith("jax>=")]
    floor = jax_floor.removeprefix("jax>=")
    assert extras["cuda"] == [f"jax[cuda12]>={floor}"]
    assert extras["tpu"] == [f"jax[tpu]>={floor}"]


def test_readme_shows_the_accelerator_installs():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    for line in (
        'pip install -e ".[cuda]"',
        'pip install -e ".[tpu]"',
        'python -c "import jax; print(jax.devices())"',
    ):
        assert line in section


def test_benchmark_arguments_and_report():
    from benchmarks import compile_cache as bench

    args = bench.parse_args(["--steps=3", "--max-examples=64", "--library-default"])
    assert args.steps == 3 and args.max_examples == 64 and args.library_default
    command = bench.train_command(args, Path("/tmp/w/runs/a"))
    assert command[:3] == [sys.executable, "-m", "launch.train"]
    assert "--config.train.num_steps=3" in command
    assert "--config.data.max_examples=64" in command
    assert "--workdir=/tmp/w/runs/a" in command

    runs = [
        {
            "name": "cold",
            "wall_seconds": 60.0,
            "hits": 0,
            "misses": 9,
            "compiled": 9,
            "written": 9,
            "compile_seconds": 30.0,
            "load_seconds": 0.0,
            "entries": 9,
            "test_accuracy": 0.5,
        },
        {
            "name": "warm",
            "wall_seconds": 31.0,
            "hits": 9,
            "misses": 0,
            "compiled": 0,
            "written": 0,
            "compile_seconds": 0.0,
            "load_seconds": 0.5,
            "entries": 9,
            "test_accuracy": 0.5,
        },
    ]
    text = bench.report(
        runs, {"date": "d", "gpus": [], "machine": "m", "python": "3", "versions": {}}, ["cmd"]
    )
    assert "| cold | 60.0 |" in text and "| warm | 31.0 |" in text
    assert "0.52x" in text  # warm wall time over cold
