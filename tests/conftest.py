"""Shared fixtures: a tiny random BERT checkpoint with its own tokenizer, and a tiny local task.

Both are made on the spot (no download, no asset needed) and are small enough that a training
step takes milliseconds.
"""

from __future__ import annotations

import csv
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# Module fixtures that train or load for tens of seconds (test module -> fixture names).
COSTLY_FIXTURES = {
    "tests/test_bridge.py": {"llm", "pair", "transfer"},
    "tests/test_decoder_sharding.py": {"sharded_runs"},
    "tests/test_faults.py": {"uninterrupted"},
    "tests/test_gguf.py": {"smollm2"},
    "tests/test_glue_suite.py": {"suite"},
    "tests/test_parallel.py": {"training_runs"},
    "tests/test_peft.py": {"trainer_runs"},
    "tests/test_pifi.py": {"launched_run"},
    "tests/test_predict.py": {"run_without_validation"},
    "tests/test_transfer.py": {"pair"},
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items) -> None:
    """Under `--dist=loadgroup` (pyproject.toml), the tests that use one of COSTLY_FIXTURES go to
    one worker, which builds the fixture once: with plain load balancing every worker that gets
    one of those tests builds it again. Other tests are balanced one by one."""
    for item in items:
        module = item.nodeid.split("::")[0]
        used = COSTLY_FIXTURES.get(module, set()) & set(getattr(item, "fixturenames", ()))
        if used:
            item.add_marker(pytest.mark.xdist_group(f"{module}::{min(used)}"))


def _share_compilation_cache() -> None:
    """One persistent compilation cache for every test of the session (both xdist workers), in
    place of the trainer's default of one beside each run directory: many tests compile the
    same tiny models' steps, and a hit skips XLA. Set as a cache of the user's own
    (`jax_compilation_cache_dir`), which pifi_jax.train.compile_cache.enable keeps; child
    processes are not affected (it is not in their environment)."""
    import tempfile

    import jax

    directory = Path(tempfile.gettempdir()) / "pifi_jax_tests_jax_cache"
    directory.mkdir(exist_ok=True)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_compilation_cache_dir", str(directory))


_share_compilation_cache()

POSITIVE = ["good", "great", "fine", "lovely", "superb", "fun"]
NEGATIVE = ["bad", "awful", "dull", "poor", "boring", "weak"]
FILLER = [
    "the",
    "a",
    "movie",
    "film",
    "plot",
    "was",
    "is",
    "very",
    "quite",
    "and",
    "story",
    "acting",
]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


# The other encoder families of write_tiny_encoder: (config class, model class, config extras).
ENCODER_FAMILIES = {
    "bert": ("BertConfig", "BertModel", {}),
    "albert": ("AlbertConfig", "AlbertModel", {"embedding_size": 16, "num_hidden_groups": 1}),
    "deberta": (
        "DebertaConfig",
        "DebertaModel",
        {"relative_attention": True, "pos_att_type": ["c2p", "p2c"], "type_vocab_size": 0},
    ),
    # The DeBERTa-v3 options: log-bucketed positions, shared keys, LayerNorm'd relative embeddings.
    "debertav3": (
        "DebertaV2Config",
        "DebertaV2Model",
        {
            "relative_attention": True,
            "pos_att_type": ["p2c", "c2p"],
            "position_buckets": 8,
            "max_relative_positions": -1,
            "share_att_key": True,
            "norm_rel_ebd": "layer_norm",
            "type_vocab_size": 0,
        },
    ),
}


def write_tiny_bert(directory: Path, seed: int = 0) -> Path:
    """A 2-layer, 32-wide random BERT with a word-level WordPiece tokenizer over a tiny vocabulary."""
    return write_tiny_encoder(directory, "bert", seed)


def write_tiny_encoder(
    directory: Path, family: str = "bert", seed: int = 0, layers: int = 2
) -> Path:
    """A `layers`-layer (2), 32-wide random encoder of `family` (ENCODER_FAMILIES) with the tiny
    tokenizer."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(SPECIAL + POSITIVE + NEGATIVE + FILLER)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
    torch.manual_seed(seed)
    config_class, model_class, extra = ENCODER_FAMILIES[family]
    config = getattr(transformers, config_class)(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        **extra,
    )
    getattr(transformers, model_class)(config).save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


# Word-level vocabulary of the tiny decoders (and encoder-decoders): specials, then every word of
# the tiny tasks, so prompts and answers tokenize one id per word.
DECODER_SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]


def tiny_word_tokenizer(directory: Path, *, bos: bool = False, eos: bool = False):
    """A whitespace word-level fast tokenizer over DECODER_SPECIAL + the tiny task words, saved in
    `directory`: pad 0, unk 1, bos 2, eos 3. With `bos` it puts <s> in front of every text (as
    Llama's tokenizer does); with `eos` </s> behind it (as T5's); else it adds nothing (GPT-2)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = DECODER_SPECIAL + POSITIVE + NEGATIVE + FILLER + SUMMARY_WORDS
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
        )
    elif eos:
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A $B </s>", special_tokens=[("</s>", vocab["</s>"])]
        )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )
    fast.save_pretrained(directory)
    return fast


# Extra words of the tiny generation task (write_tiny_pairs).
SUMMARY_WORDS = ["summary", "positive", "negative", "review", ":"]

# Tiny decoder configs per family (transformers config class, kwargs); vocab_size is set to the
# tokenizer's. pad 0, bos 2, eos 3.
_TINY_DECODERS = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=2, intermediate_size=37)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, intermediate_size=37)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, intermediate_size=37)),
    "gemma2": ("Gemma2Config", dict(num_key_value_heads=2, intermediate_size=37, head_dim=8)),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_head=4, n_positions=128)),
    "falcon": ("FalconConfig", dict(new_decoder_architecture=False, multi_query=True)),
}


def write_tiny_decoder(
    directory: Path, family: str = "llama", seed: int = 0, layers: int = 2
) -> Path:
    """A `layers`-layer (2), 32-wide random causal LM of `family` (_TINY_DECODERS) with the tiny
    word-level tokenizer (Llama-like families put <s> in front), saved as a Hugging Face
    checkpoint."""
    import torch
    import transformers

    directory = Path(directory)
    fast = tiny_word_tokenizer(directory, bos=family != "gpt2")
    config_class, extra = _TINY_DECODERS[family]
    common = dict(vocab_size=len(fast), pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if family != "gpt2":
        common.update(
            hidden_size=32,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=128,
        )
    else:
        common.update(n_layer=layers)
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**common, **extra)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def write_tiny_seq2seq(directory: Path, family: str = "t5", seed: int = 0) -> Path:
    """A 2-layer, 32-wide random encoder-decoder ("t5" or "bart") with the tiny word-level
    tokenizer (eos behind every text), saved as a Hugging Face checkpoint. No dropout, so a
    training loss equals the reference model's in eval mode."""
    import torch
    import transformers

    directory = Path(directory)
    fast = tiny_word_tokenizer(directory, eos=True)
    common = dict(vocab_size=len(fast), pad_token_id=0, eos_token_id=3, decoder_start_token_id=0)
    if family == "t5":
        config = transformers.T5Config(
            **common, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        )  # fmt: skip
    else:
        common.update(decoder_start_token_id=3, bos_token_id=2, forced_eos_token_id=None)
        config = transformers.BartConfig(
            **common, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37,
            max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        )  # fmt: skip
    torch.manual_seed(seed)
    transformers.AutoModelForSeq2SeqLM.from_config(config).save_pretrained(directory)
    return directory


def write_tiny_pairs(
    directory: Path, sizes=(("train", 64), ("validation", 16), ("test", 16)), seed=0
) -> dict:
    """source,target csv files of a learnable generation task over the tiny vocabulary: the
    source is a short review, the target "positive" or "negative" then the review's first word."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, n in sizes:
        path = directory / f"{split}.csv"
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["source", "target"])
            for _ in range(n):
                label = rng.randint(0, 1)
                words = rng.choices(FILLER, k=rng.randint(2, 6)) + [
                    rng.choice(POSITIVE if label else NEGATIVE)
                ]
                rng.shuffle(words)
                target = f"{'positive' if label else 'negative'} {words[0]}"
                writer.writerow([" ".join(words), target])
        files[split] = str(path)
    return files


def write_tiny_task(
    directory: Path, sizes=(("train", 96), ("validation", 32), ("test", 32)), seed=0
) -> dict:
    """sst2-shaped csv files (text,label): the label is whether a positive word is present."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, n in sizes:
        path = directory / f"{split}.csv"
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            for _ in range(n):
                label = rng.randint(0, 1)
                words = rng.choices(FILLER, k=rng.randint(2, 9)) + [
                    rng.choice(POSITIVE if label else NEGATIVE)
                ]
                rng.shuffle(words)
                writer.writerow([" ".join(words), label])
        files[split] = str(path)
    return files


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return write_tiny_decoder(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> Path:
    return write_tiny_seq2seq(tmp_path_factory.mktemp("tiny_t5"), "t5")


@pytest.fixture(scope="session")
def tiny_pair_files(tmp_path_factory) -> dict:
    return write_tiny_pairs(tmp_path_factory.mktemp("tiny_pairs"))


@pytest.fixture(scope="session")
def tiny_task_files(tmp_path_factory) -> dict:
    return write_tiny_task(tmp_path_factory.mktemp("tiny_task"))


def tiny_overrides(model_dir, files: dict) -> list[str]:
    """Command-line overrides that point configs/classify.py:runlocal at the tiny model and task."""
    out = [f"--config.model.path={model_dir}", "--config.task=sst2", "--config.data.source=local"]
    out += [f"--config.data.data_files.{split}={path}" for split, path in files.items()]
    return out


def subprocess_env(devices: int = 1, quick_compile: bool = False) -> dict:
    """Environment for a child python: the repo importable and `devices` fake CPU devices.
    `quick_compile`: XLA's CPU backend at optimisation level 0, which compiles about three
    times faster; for children whose every compared number comes from children started the same
    way (launcher plumbing), never for numbers compared with this process's."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    if quick_compile:
        env["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run_child(argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`argv` (a command line, its first item sys.executable) in a child python at the repo with
    subprocess_env(1, quick_compile=True): for launcher runs whose compared numbers all come from
    such children. Fails the test with the output's tail unless the child exits 0."""
    done = subprocess.run(
        argv,
        cwd=REPO,
        env=subprocess_env(1, quick_compile=True),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def load_config(spec: str, overrides: list[str] = ()):
    """`--config=spec` plus `--config.x.y=v` overrides, parsed exactly as the launcher does."""
    from absl import flags
    from ml_collections import config_flags

    flag_values = flags.FlagValues()
    argv = ["launch", f"--config={spec}", *overrides]
    config_flags.DEFINE_config_file("config", None, flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


def run_crashing_after(monkeypatch, steps: int, config, workdir) -> None:
    """Runs train_and_evaluate(config, workdir) until `steps` train steps are done and their
    checkpoint is on disk, then crashes it (as a kill would); the next run resumes from there."""
    from pifi_jax.train import loop, train_and_evaluate

    setup = loop.setup_run

    def crashing_setup(*args, **kwargs):
        run = setup(*args, **kwargs)
        step, calls = run.train_step, []

        def train_step(*a):
            if len(calls) == steps:
                run.checkpointer.wait()
                raise RuntimeError("simulated crash")
            calls.append(1)
            return step(*a)

        run.train_step = train_step
        return run

    with monkeypatch.context() as patch:
        patch.setattr(loop, "setup_run", crashing_setup)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train_and_evaluate(config, workdir)


# On CI (CI=true), a missing reference library (torch, transformers, peft, sklearn) stops the
# session, and a skip caused by importorskip of one is a failure: tests/ci_references.py.
from tests.ci_references import (  # noqa: E402, F401  (pytest hooks)
    pytest_make_collect_report,
    pytest_runtest_makereport,
    pytest_sessionstart,
)
