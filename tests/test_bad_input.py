"""Bad input is refused (issue 18): every row of CASES is something a user could get wrong in a
config, a data file, a checkpoint or an adapter. Each is tried as the user would meet it (through
the launcher's locked config flags and `train_and_evaluate`, or the library call named), and must
raise the row's error with a message that names the bad key, file, column, row or tensor. A run
refused at its start leaves no run directory behind.

The messages are also the table of docs/reliability.md ("Bad input"); each case checks that its
row there is its current message. After changing a message, rewrite the table with

    python -m tests.test_bad_input
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "reliability.md"
BEGIN = "<!-- bad-input table: written by `python -m tests.test_bad_input` -->"
END = "<!-- end of the bad-input table -->"


class Context:
    """Where a case runs: a scratch directory, the tiny models and the tiny task's csv files."""

    def __init__(self, root: Path, bert: Path, files: dict):
        self.root, self.bert, self.files = root, bert, files
        self.workdir = root / "run"

    def write(self, name: str, content: str | bytes) -> str:
        path = self.root / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return str(path)

    def config(self, *overrides: str, spec: str = "configs/classify.py:runlocal", tiny=True):
        """The config the launcher would build: `--config=spec` plus overrides, locked as
        launch/common.py locks it (a key that does not exist is an error)."""
        from absl import flags
        from ml_collections import config_flags

        from tests.conftest import tiny_overrides

        argv = ["launch", f"--config={REPO / spec}"]
        argv += tiny_overrides(self.bert, self.files) if tiny else []
        argv += list(overrides)
        values = flags.FlagValues()
        config_flags.DEFINE_config_file(
            "config", None, flag_values=values, sys_argv=argv, lock_config=True
        )
        values(argv)
        return values.config

    def train(self, *overrides: str, spec: str = "configs/classify.py:runlocal") -> None:
        from pifi_jax.train import train_and_evaluate

        train_and_evaluate(self.config(*overrides, spec=spec), self.workdir)


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    given: str  # what the user gave (a docs cell)
    attempt: Callable[[Context], object]  # does it; must raise
    error: type[BaseException]
    names: tuple[str, ...]  # what the message must say (regexes); {root} is the scratch dir
    starts_a_run: bool = True  # a refused run start: no run directory may be left


def _data_file(name: str, content: str | bytes, *extra: str):
    """A case whose training file is `content` (the tiny validation and test files stay)."""

    def attempt(ctx: Context):
        ctx.train(f"--config.data.data_files.train={ctx.write(name, content)}", *extra)

    return attempt


def _local_file(name: str, content: str | bytes):
    """A task=local run (labels read from the training file) on `content`."""
    return _data_file(name, content, "--config.task=local")


def _gguf_of(arch: str):
    """configs/pifi.py with an LLM GGUF file of architecture `arch`."""

    def attempt(ctx: Context):
        import gguf

        path = ctx.root / f"{arch}.gguf"
        writer = gguf.GGUFWriter(str(path), arch)
        writer.add_block_count(1)
        writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        ctx.train(f"--config.pifi.llm={path}", spec="configs/pifi.py:runlocal")

    return attempt


def _checkpoint_of_model_type(model_type: str):
    def attempt(ctx: Context):
        model = ctx.root / "other_model"
        shutil.copytree(ctx.bert, model)
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
        ctx.train(f"--config.model.path={model}")

    return attempt


def _checkpoint_with_other_weights(ctx: Context):
    """Weights of the tiny BERT under a config.json of a wider one (two checkpoints' files mixed)."""
    from tests.conftest import write_tiny_encoder

    wide = write_tiny_encoder(ctx.root / "wide", "bert", layers=2)
    config = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**config, "hidden_size": 48}))
    ctx.train(f"--config.model.path={wide}")


def _adapter_for(kind: str):
    """An adapter saved from one tiny BERT, loaded into another: `layers` differ (keys) or the
    LoRA rank differs (shapes)."""

    def attempt(ctx: Context):
        import pifi_jax
        from pifi_jax import peft
        from tests.conftest import write_tiny_encoder

        def lora(model_dir, r):
            config = peft.LoraConfig(r=r, target_modules=("query", "value"))
            return pifi_jax.from_pretrained(str(model_dir), task="classification", peft=config)

        saved_from = write_tiny_encoder(ctx.root / "three_layers", "bert", layers=3)
        module, params = lora(saved_from if kind == "keys" else ctx.bert, 4)
        peft.save_adapter(module, params, ctx.root / "adapter", format="peft")
        module, params = lora(ctx.bert, 4 if kind == "keys" else 8)
        peft.load_adapter(module, params, ctx.root / "adapter")

    return attempt


def _resume_with_another_model(ctx: Context):
    """A run of the tiny BERT resumed with model.path set to another checkpoint."""
    from tests.conftest import write_tiny_encoder

    ctx.train("--config.train.num_steps=1", "--config.train.checkpoint_every_steps=1")
    other = write_tiny_encoder(ctx.root / "albert", "albert")
    before = (ctx.workdir / "config.json").read_text()
    try:
        ctx.train("--config.train.num_steps=1", f"--config.model.path={other}")
    finally:
        assert (ctx.workdir / "config.json").read_text() == before  # not overwritten


def _resume_after_the_checkpoint_was_replaced(ctx: Context):
    """A run whose model.path directory now holds another model (3 layers, not 2): same config,
    other parameters. Refused; the run's checkpoints stay where they are (none set aside)."""
    from tests.conftest import write_tiny_encoder

    model = ctx.root / "model"
    shutil.copytree(ctx.bert, model)
    steps = ("--config.train.num_steps=2", "--config.train.checkpoint_every_steps=1")
    ctx.train(*steps, f"--config.model.path={model}")
    shutil.rmtree(model)
    write_tiny_encoder(model, "bert", layers=3)
    try:
        ctx.train("--config.train.num_steps=3", f"--config.model.path={model}")
    finally:
        kept = sorted(p.name for p in (ctx.workdir / "checkpoints").iterdir())
        assert kept == ["1", "2", "best"], kept


CSV = "text,label\n"
CASES = [
    Case(
        "unknown_key",
        "`--config.train.num_stepz=3`",
        lambda ctx: ctx.config("--config.train.num_stepz=3"),
        AttributeError,
        ("num_stepz", 'Did you mean "num_steps"'),
        starts_a_run=False,
    ),
    Case(
        "misspelled_section",
        "`--config.trian.num_steps=3`",
        lambda ctx: ctx.config("--config.trian.num_steps=3"),
        KeyError,
        ("trian", 'Did you mean "train"'),
        starts_a_run=False,
    ),
    Case(
        "wrong_type_int",
        "`--config.train.num_steps=abc`",
        lambda ctx: ctx.config("--config.train.num_steps=abc"),
        Exception,
        (r"--config\.train\.num_steps=abc",),
        starts_a_run=False,
    ),
    Case(
        "wrong_type_tuple",
        "`--config.data.buckets=wide`",
        lambda ctx: ctx.train("--config.data.buckets=wide"),
        ValueError,
        (r"data\.buckets", "'wide'"),
    ),
    Case(
        "unknown_task",
        "`--config.task=sst3`",
        lambda ctx: ctx.train("--config.task=sst3"),
        (KeyError, ValueError),
        ("sst3", "sst2"),
    ),
    Case(
        "unknown_peft_method",
        "`--config.peft.method=loar`",
        lambda ctx: ctx.train("--config.peft.method=loar"),
        ValueError,
        ("loar", "lora"),
    ),
    Case(
        "unknown_dtype",
        "`--config.model.dtype=float33`",
        lambda ctx: ctx.train("--config.model.dtype=float33"),
        (TypeError, ValueError),
        ("float33",),
    ),
    Case(
        "column_map_without_equals",
        "`--config.data.column_map=sentence`",
        lambda ctx: ctx.train("--config.data.column_map=sentence"),
        ValueError,
        (r"data\.column_map", "'sentence'", "task_column=file_column"),
    ),
    Case(
        "column_map_to_a_missing_column",
        "`--config.data.column_map=text=sentence` (no such column)",
        lambda ctx: ctx.train("--config.data.column_map=text=sentence"),
        ValueError,
        (r"train\.csv", "'sentence'", "columns present"),
    ),
    Case(
        "empty_file",
        "a training csv of 0 bytes",
        _data_file("empty.csv", ""),
        ValueError,
        (r"empty\.csv", "empty"),
    ),
    Case(
        "header_only",
        "a training csv with a header and no rows",
        _data_file("header.csv", CSV),
        ValueError,
        (r"header\.csv", "empty"),
    ),
    Case(
        "blank_lines_only",
        "a training jsonl of blank lines",
        _data_file("blank.jsonl", "\n\n\n"),
        ValueError,
        (r"blank\.jsonl",),
    ),
    Case(
        "not_utf8",
        "a Latin-1 training csv (`café` as byte 0xe9 on line 3)",
        _data_file("latin1.csv", b"text,label\ngood film,1\ncaf\xe9 scene,0\n"),
        ValueError,
        (r"latin1\.csv", "line 3", "0xe9", "UTF-8"),
    ),
    Case(
        "nan_label",
        "an empty label field (row 1) in a csv",
        _data_file("nan.csv", CSV + "good film,1\nbad film,\nok film,0\n"),
        ValueError,
        (r"nan\.csv", "'label'", "row 1", "missing label"),
    ),
    Case(
        "nan_label_jsonl",
        "`NaN` as a label (row 1) in a jsonl file, task=local",
        _local_file("nan.jsonl", '{"text": "good", "label": 1}\n{"text": "bad", "label": NaN}\n'),
        ValueError,
        (r"nan\.jsonl", "'label'", "row 1", "missing label"),
    ),
    Case(
        "label_not_a_class",
        "a word among integer class ids (sst2)",
        _data_file("word.csv", CSV + "good film,1\nbad film,neg\nok film,0\n"),
        ValueError,
        (r"word\.csv", "'label'", "row 1", "'neg'", r"\[0, 2\)"),
    ),
    Case(
        "mixed_label_types",
        "labels `1`, `neg`, `0` (numbers and names), task=local",
        _local_file("mixed.csv", CSV + "good film,1\nbad film,neg\nok film,0\n"),
        ValueError,
        (r"mixed\.csv", "'label'", "row 0", "row 1", "numbers", "names"),
    ),
    Case(
        "mixed_label_types_jsonl",
        'labels `1` and `["a"]` (a list) in a jsonl file, task=local',
        _local_file(
            "list.jsonl", '{"text": "good", "label": 1}\n{"text": "bad", "label": ["a"]}\n'
        ),
        ValueError,
        (r"list\.jsonl", "'label'", "row 1", "multi_label"),
    ),
    Case(
        "one_class",
        "a training file whose labels are all `1`, task=local",
        _local_file("one.csv", CSV + "good film,1\nfine film,1\n"),
        ValueError,
        (r"one\.csv", "'label'", "1 distinct"),
    ),
    Case(
        "zero_length_text",
        'an empty text `""` (row 1)',
        _data_file("empty_text.csv", CSV + 'good film,1\n"",0\nok film,0\n'),
        ValueError,
        (r"empty_text\.csv", "'text'", "row 1", "empty text"),
    ),
    Case(
        "whitespace_text",
        "a text of spaces only (row 2)",
        _data_file("spaces.csv", CSV + 'good film,1\nok film,0\n"   ",0\n'),
        ValueError,
        (r"spaces\.csv", "'text'", "row 2", "empty text"),
    ),
    Case(
        "text_longer_than_every_bucket",
        "a 200-word text with `data.max_length=64` and `data.buckets=(16,32)`",
        _data_file(
            "long.csv",
            CSV + "good film,1\n" + " ".join(["good"] * 200) + ",1\n",
            "--config.data.max_length=64",
        ),
        ValueError,
        (r"long\.csv", "row 1", "64 tokens", r"data\.buckets \(16, 32\)", r"data\.max_length"),
    ),
    Case(
        "missing_file",
        "`--config.data.data_files.train=nowhere.csv`",
        lambda ctx: ctx.train(f"--config.data.data_files.train={ctx.root / 'nowhere.csv'}"),
        FileNotFoundError,
        (r"data\.data_files\.train", r"nowhere\.csv", "no such file"),
    ),
    Case(
        "unknown_file_type",
        "a training file `train.xlsx`",
        _data_file("train.xlsx", "text,label\n"),
        ValueError,
        (r"train\.xlsx", "unknown file type"),
    ),
    Case(
        "checkpoint_of_unsupported_model_type",
        "`model.path` a checkpoint whose config.json says `model_type: mamba`",
        _checkpoint_of_model_type("mamba"),
        ValueError,
        (r"other_model/config\.json", "'mamba'"),
    ),
    Case(
        "checkpoint_with_other_shapes",
        "`model.path` a checkpoint whose config.json says hidden size 48, its weights 32",
        _checkpoint_with_other_weights,
        ValueError,
        (r"embeddings", r"DIR/wide", r"\(32,\)", r"\(48,\)"),
    ),
    Case(
        "resume_with_another_architecture",
        "a run directory resumed with `model.path` of another architecture (ALBERT)",
        _resume_with_another_model,
        ValueError,
        (r"model\.path", "saved", "now"),
        starts_a_run=False,
    ),
    Case(
        "resume_after_the_checkpoint_was_replaced",
        "a run resumed after its `model.path` directory was overwritten by a 3-layer model",
        _resume_after_the_checkpoint_was_replaced,
        ValueError,
        (
            r"DIR/run/checkpoints/2",
            "another model's parameters",
            "layer_2",
            "not in the checkpoint",
        ),
        starts_a_run=False,
    ),
    Case(
        "gguf_of_unsupported_architecture",
        "`pifi.llm` a GGUF file of architecture `gpt2`",
        _gguf_of("gpt2"),
        ValueError,
        (r"gpt2\.gguf", "architecture 'gpt2'", r"only \['llama', 'qwen2'\]"),
    ),
    Case(
        "adapter_for_another_base_keys",
        "`load_adapter`: a LoRA adapter of a 3-layer model into a 2-layer one",
        _adapter_for("keys"),
        ValueError,
        (r"layer\.2", "no place in the model"),
        starts_a_run=False,
    ),
    Case(
        "adapter_for_another_base_shapes",
        "`load_adapter`: a rank-4 LoRA adapter into a rank-8 model",
        _adapter_for("shapes"),
        ValueError,
        ("lora_A", r"\(4, 32\)", r"\(32, 8\)", "another base model"),
        starts_a_run=False,
    ),
    Case(
        "trainable_rules_freeze_everything",
        '`--config.train.trainable_rules=\'((".*","frozen"),)\'`',
        lambda ctx: ctx.train('--config.train.trainable_rules=((".*","frozen"),)'),
        ValueError,
        (r"train\.trainable_rules", "frozen", r"train\.epochs=0"),
    ),
    Case(
        "trainable_rules_bad_label",
        '`--config.train.trainable_rules=\'((".*","train"),)\'`',
        lambda ctx: ctx.train('--config.train.trainable_rules=((".*","train"),)'),
        ValueError,
        ("'train'", "trainable", "frozen"),
    ),
    Case(
        "nonfinite_mode",
        "`--config.train.nonfinite=ignore`",
        lambda ctx: ctx.train("--config.train.nonfinite=ignore"),
        ValueError,
        (r"train\.nonfinite", "'ignore'"),
    ),
]


def attempt(case: Case, ctx: Context) -> BaseException:
    """Runs the case; returns what it raised (fails if it raised nothing, or the wrong error)."""
    try:
        case.attempt(ctx)
    except case.error as error:
        return error
    raise AssertionError(f"{case.id}: accepted ({case.given})")


def message(error: BaseException, ctx: Context) -> str:
    """The message as the docs show it: scratch paths shortened, one line."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    for path, short in ((ctx.root, "DIR"), (ctx.bert, "TINY_BERT")):
        text = text.replace(str(path), short)
    for split, path in ctx.files.items():
        text = text.replace(str(path), f"{split}.csv")
    return " ".join(text.split())


def table_row(case: Case, error: BaseException, ctx: Context) -> str:
    cell = message(error, ctx).replace("|", "\\|")
    return f"| `{case.id}` | {case.given} | `{type(error).__name__}`: {cell} |"


def documented_rows() -> dict[str, str]:
    """case id -> its row in docs/reliability.md's table."""
    text = DOCS.read_text(encoding="utf-8")
    if BEGIN not in text:
        return {}
    body = text.split(BEGIN, 1)[1].split(END, 1)[0]
    rows = {}
    for line in body.splitlines():
        found = re.match(r"\| `(\w+)` \|", line)
        if found:
            rows[found[1]] = line
    return rows


@pytest.fixture
def ctx(tiny_bert_dir, tiny_task_files, tmp_path) -> Context:
    """A fresh scratch directory per case, beside the session's tiny model and task."""
    return Context(tmp_path, tiny_bert_dir, tiny_task_files)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_naming_what_is_wrong(case, ctx):
    error = attempt(case, ctx)
    text = message(error, ctx)
    for expected in case.names:
        assert re.search(expected.format(root="DIR"), text), (
            f"{case.id}: {expected!r} not in {text!r}"
        )
    if case.starts_a_run:
        assert not ctx.workdir.exists(), sorted(map(str, ctx.workdir.rglob("*")))
    documented = documented_rows().get(case.id)
    assert documented == table_row(case, error, ctx), (
        f"docs/reliability.md's row for {case.id} is out of date; run python -m tests.test_bad_input"
    )


def test_the_docs_table_has_a_row_per_case_and_no_other():
    assert sorted(documented_rows()) == sorted(c.id for c in CASES)


def write_docs_table() -> None:
    """Runs every case in a scratch directory and writes its row into docs/reliability.md."""
    from tests.conftest import write_tiny_bert, write_tiny_task

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        bert = write_tiny_bert(scratch / "tiny_bert")
        shared = Context(scratch, bert, write_tiny_task(scratch / "tiny_task"))
        lines = ["| case | input | refused with |", "|---|---|---|"]
        for case in CASES:
            ctx = Context(scratch / case.id, shared.bert, shared.files)
            ctx.root.mkdir()
            error = attempt(case, ctx)
            lines.append(table_row(case, error, ctx))
            print(lines[-1], flush=True)
    text = DOCS.read_text(encoding="utf-8")
    table = BEGIN + "\n" + "\n".join(lines) + "\n" + END
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head + table + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + table + "\n"
    DOCS.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    write_docs_table()
