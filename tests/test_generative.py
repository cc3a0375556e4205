"""The generative objectives: causal-LM loss masking and parity with transformers, the loss that
builds no one-hot, generation data refused with file / column / row, and whole runs of
configs/causal_lm.py (generation-scored evaluation, predictions files, resume after a stop)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pifi_jax
from pifi_jax import data
from pifi_jax.train import CausalLM, train_and_evaluate
from pifi_jax.train.metrics import next_token_loss, token_cross_entropy
from pifi_jax.train.partition import split_params
from tests.conftest import load_config, run_crashing_after

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _quiet(*_):
    pass


def _causal_batch(tokenizer, prompts, targets, length=16):
    """encode_generation + Batcher: one right-padded causal_lm training batch."""
    examples = data.Examples((list(prompts),), None, "test", targets=list(targets))
    enc = data.encode_generation(
        tokenizer,
        examples,
        layout="causal_lm",
        prompt="{source}",
        max_length=12,
        max_target_length=6,
    )
    batcher = data.Batcher(
        enc, len(prompts), (length,), shuffle=False, seed=0, drop_remainder=False
    )
    return enc, next(batcher.batches(0))


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir):
    module, params = pifi_jax.from_pretrained(tiny_llama_dir, task="causal_lm", log=_quiet)
    return module, params, data.load_tokenizer(str(tiny_llama_dir))


def test_causal_batch_marks_target_tokens_only(tiny_llama):
    _, _, tok = tiny_llama
    enc, batch = _causal_batch(tok, ["the movie was", "a plot"], ["good", "dull and weak"])
    # <s> the movie was | good </s>   and   <s> a plot | dull and weak </s>
    assert enc.prompt_lengths.tolist() == [4, 3]
    assert batch["loss_mask"][0].tolist()[:7] == [0, 0, 0, 0, 1, 1, 0]
    assert batch["loss_mask"][1].tolist()[:8] == [0, 0, 0, 1, 1, 1, 1, 0]
    assert batch["input_ids"][0, 5] == tok.eos_token_id
    assert batch["attention_mask"].sum(1).tolist() == [6, 7]


def test_prompt_labels_do_not_count(tiny_llama):
    """Changing the prompt tokens as labels (with the logits fixed) leaves the loss unchanged, and
    the loss's gradient with respect to prompt and padding positions is exactly zero."""
    module, params, tok = tiny_llama
    _, batch = _causal_batch(tok, ["the movie was", "a plot"], ["good", "dull and weak"])
    logits = module.apply({"params": params}, batch["input_ids"], batch["attention_mask"])
    ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["loss_mask"])
    relabelled = jnp.where(mask == 1, ids, (ids + 7) % logits.shape[-1])
    assert not np.array_equal(relabelled, ids)
    base = next_token_loss(logits, ids, mask)
    np.testing.assert_array_equal(next_token_loss(logits, relabelled, mask), base)
    grad = jax.grad(lambda lg: next_token_loss(lg, ids, mask)[0])(logits)
    counted = np.asarray(mask[:, 1:]).astype(bool)  # position t predicts token t + 1
    assert np.all(np.asarray(grad[:, :-1])[~counted] == 0)
    assert np.all(np.asarray(grad[:, -1]) == 0)
    assert np.all(np.abs(np.asarray(grad[:, :-1])[counted]).sum(-1) > 0)


def test_causal_lm_loss_matches_transformers_with_masked_labels(tiny_llama_dir, tiny_llama):
    """The objective's loss equals transformers' LlamaForCausalLM loss with -100 on the prompt
    and padding labels, on the same weights."""
    module, params, tok = tiny_llama
    _, batch = _causal_batch(tok, ["the movie was", "a plot is"], ["good", "dull and weak"])
    objective = CausalLM(module, tok)
    trainable, frozen = split_params(params, [(".*", "trainable")])
    loss, aux = objective.loss_fn(trainable, frozen, batch, jax.random.key(0))

    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    labels = np.where(batch["loss_mask"] == 1, batch["input_ids"], -100)
    with torch.no_grad():
        out = reference(
            input_ids=torch.as_tensor(batch["input_ids"], dtype=torch.long),
            attention_mask=torch.as_tensor(batch["attention_mask"], dtype=torch.long),
            labels=torch.as_tensor(labels, dtype=torch.long),
        )
    np.testing.assert_allclose(float(loss), float(out.loss), rtol=1e-5)
    assert int(aux["weight"]) == int(batch["loss_mask"].sum()) == 6


def test_token_cross_entropy_builds_no_one_hot():
    """Neither the loss nor its gradient, as compiled, holds a [batch, length, vocab] 0/1 tensor
    (with a 262k vocabulary that alone would be gigabytes); a one-hot cross-entropy does."""
    batch, length, vocab = 2, 5, 1031
    logits = jnp.zeros((batch, length, vocab))
    targets = jnp.zeros((batch, length), jnp.int32)
    weights = jnp.ones((batch, length))
    mask_shape = f"pred[{batch},{length},{vocab}]"

    def compiled(loss):
        return jax.jit(jax.value_and_grad(loss)).lower(logits).compile().as_text()

    ours = compiled(lambda lg: token_cross_entropy(lg, targets, weights)[0])
    assert mask_shape not in ours
    one_hot = compiled(lambda lg: -jnp.sum(jax.nn.one_hot(targets, vocab) * jax.nn.log_softmax(lg)))
    assert mask_shape in one_hot  # the check sees a one-hot when there is one
    # ...and it is the cross-entropy: log(vocab) for uniform logits.
    total, count = token_cross_entropy(logits, targets, weights)
    np.testing.assert_allclose(float(total / count), np.log(vocab), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Bad generation data


def _write(path: Path, rows, header=("source", "target")):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def test_bad_generation_files_are_refused_with_file_column_and_row(tmp_path, tiny_llama):
    _, _, tok = tiny_llama
    task = data.get_task("pairs")
    missing = _write(tmp_path / "missing.csv", [["a", "b"]], header=("source", "answer"))
    with pytest.raises(ValueError, match=r"missing\.csv.*missing column 'target'"):
        data.load_examples(task, "train", data_files={"train": missing})
    empty = _write(tmp_path / "empty.csv", [["the movie", "good"], ["a plot", " "]])
    with pytest.raises(ValueError, match=r"empty\.csv: column 'target' row 1: missing or empty"):
        data.load_examples(task, "train", data_files={"train": empty})
    long = _write(tmp_path / "long.csv", [["the movie", "good"], ["a plot", "dull " * 9]])
    examples = data.load_examples(task, "train", data_files={"train": long})
    for layout in ("causal_lm", "seq2seq"):
        with pytest.raises(ValueError, match=r"long\.csv: column 'target' row 1: the target has"):
            data.encode_generation(
                tok, examples, layout=layout, prompt="{source}", max_length=8, max_target_length=6
            )
    # The column map renames the file's columns; the message names the file's column.
    renamed = _write(tmp_path / "renamed.csv", [["a plot", "dull " * 9]], header=("q", "a"))
    examples = data.load_examples(
        task, "train", data_files={"train": renamed}, column_map={"source": "q", "target": "a"}
    )
    assert examples.targets == ["dull " * 9]


# ---------------------------------------------------------------------------------------------
# Whole runs


def _causal_config(model_dir, files, extra=()):
    overrides = [f"--config.model.path={model_dir}", "--config.task=pairs"]
    overrides += [f"--config.data.data_files.{s}={p}" for s, p in files.items()]
    return load_config("configs/causal_lm.py:runlocal", [*overrides, *extra])


def test_causal_lm_run_scores_generations_and_writes_predictions(
    tmp_path, tiny_llama_dir, tiny_pair_files
):
    config = _causal_config(tiny_llama_dir, tiny_pair_files, ["--config.train.num_steps=3"])
    results = train_and_evaluate(config, tmp_path / "run")
    for split in ("validation", "test"):
        for name in ("rouge1", "rouge2", "rougeL", "bleu"):
            assert 0.0 <= results[f"{split}/{name}"] <= 100.0 + 1e-9
    records = [json.loads(line) for line in open(tmp_path / "run" / "predictions_test.jsonl")]
    assert len(records) == 16 and {r["index"] for r in records} == set(range(16))
    with open(tiny_pair_files["test"]) as f:
        references = [row["target"] for row in csv.DictReader(f)]
    assert [r["reference"] for r in records] == references
    # The scores are those of the written predictions (rouge-score, independently).
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    rouge1 = np.mean(
        [scorer.score(r["reference"], r["prediction"])["rouge1"].fmeasure for r in records]
    )
    np.testing.assert_allclose(results["test/rouge1"], 100 * rouge1, rtol=1e-9)
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    # Predicting new sources from the run directory generates what evaluation generated.
    from pifi_jax.train.predict import Predictor

    with open(tiny_pair_files["test"]) as f:
        sources = [row["source"] for row in csv.DictReader(f)]
    rows = Predictor.from_workdir(tmp_path / "run").predict((sources,), batch_size=5)
    assert [r["source"] for r in rows] == sources
    assert [r["generated"] for r in rows] == [r["prediction"] for r in records]


def test_causal_lm_resume_equals_uninterrupted_run(
    tmp_path, tiny_llama_dir, tiny_pair_files, monkeypatch
):
    """Crashed after 3 of 4 steps and run again, a generative run ends as the uninterrupted one:
    the same training losses and the same scores."""

    extra = ["--config.train.num_steps=4", "--config.train.log_every_steps=1"]
    whole = train_and_evaluate(
        _causal_config(tiny_llama_dir, tiny_pair_files, extra), tmp_path / "a"
    )

    run_crashing_after(
        monkeypatch, 3, _causal_config(tiny_llama_dir, tiny_pair_files, extra), tmp_path / "b"
    )
    resumed = train_and_evaluate(
        _causal_config(tiny_llama_dir, tiny_pair_files, extra), tmp_path / "b"
    )

    def losses(run):
        lines = [json.loads(x) for x in open(tmp_path / run / "metrics.jsonl")]
        return [x["train/loss"] for x in lines if "train/loss" in x]

    assert losses("a") == losses("b") and len(losses("a")) == 4
    for key in ("validation/rougeL", "test/rougeL", "test/bleu"):
        assert resumed[key] == whole[key]


def test_seq2seq_loss_matches_transformers_with_padding_ignored(tiny_t5_dir):
    """The seq2seq objective (targets shifted right behind the decoder start token, padding
    ignored) equals transformers' T5ForConditionalGeneration loss with -100 on padded labels."""
    from pifi_jax.train import Seq2Seq

    module, params = pifi_jax.from_pretrained(tiny_t5_dir, task="seq2seq", log=_quiet)
    tok = data.load_tokenizer(str(tiny_t5_dir))
    examples = data.Examples(
        (["the movie was good", "a dull plot"],), None, "test", targets=["positive the", "negative"]
    )
    enc = data.encode_generation(
        tok,
        examples,
        layout="seq2seq",
        prompt="summary : {source}",
        max_length=12,
        max_target_length=6,
    )
    assert enc.target_ids[1].tolist()[-1] == tok.eos_token_id
    batch = next(
        data.Batcher(
            enc, 2, (8,), shuffle=False, seed=0, drop_remainder=False, target_buckets=(4, 6)
        ).batches(0)
    )
    assert batch["target_ids"].shape == (2, 4) and batch["target_mask"].sum() == 5
    trainable, frozen = split_params(params, [(".*", "trainable")])
    loss, aux = Seq2Seq(module, tok).loss_fn(trainable, frozen, batch, jax.random.key(0))

    reference = transformers.AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir).eval()
    labels = np.where(batch["target_mask"] == 1, batch["target_ids"], -100)
    with torch.no_grad():
        out = reference(
            input_ids=torch.as_tensor(batch["input_ids"], dtype=torch.long),
            attention_mask=torch.as_tensor(batch["attention_mask"], dtype=torch.long),
            labels=torch.as_tensor(labels, dtype=torch.long),
        )
    np.testing.assert_allclose(float(loss), float(out.loss), rtol=1e-5)
    assert int(aux["weight"]) == 5


def test_best_checkpoint_is_chosen_by_a_generation_metric_and_reevaluated(
    tmp_path, tiny_llama_dir, tiny_pair_files
):
    """Evaluated after every step, the run keeps the checkpoint with the best validation rougeL
    (the task's primary metric), and `evaluate_run` (launch/eval.py) scores that checkpoint again
    to the same numbers."""
    from pifi_jax.train import evaluate_run

    extra = [
        "--config.train.num_steps=4",
        "--config.train.eval_every_steps=1",
        "--config.peft.method=full",
        "--config.optim.lr=0.02",
        "--config.optim.warmup_ratio=0",
    ]
    config = _causal_config(tiny_llama_dir, tiny_pair_files, extra)
    results = train_and_evaluate(config, tmp_path / "run")
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    scores = [x["validation/rougeL"] for x in lines if "validation/rougeL" in x]
    assert len(scores) == 4 and len(set(scores)) > 1, scores  # the choice is not trivial
    assert results["validation/rougeL"] == max(scores)
    again = evaluate_run(config, tmp_path / "run")
    for key in ("validation/rougeL", "test/rouge1", "test/bleu"):
        assert again[key] == results[key]


def test_sweep_runs_a_generative_config_and_plots_its_primary_metric(
    tmp_path, tiny_llama_dir, tiny_pair_files
):
    """launch/sweep.py's library call on configs/causal_lm.py: one run per LoRA rank, a CSV with
    the generation scores, and the plot of validation rougeL (the task's primary metric)."""
    from pifi_jax.train import sweep

    config = _causal_config(tiny_llama_dir, tiny_pair_files, ["--config.train.num_steps=1"])
    rows = sweep.run_sweep(config, ["peft.r"], [2, 4], tmp_path)
    assert [row["peft.r"] for row in rows] == [2, 4]
    assert rows[0]["trainable_params"] < rows[1]["trainable_params"]
    header = open(tmp_path / sweep.CSV_NAME).readline()
    assert "validation/rougeL" in header and "test/bleu" in header
    assert (tmp_path / sweep.PLOT_NAME).stat().st_size > 0
