"""Automatic layer selection: it finds the layer that carries the label, streams the LLM one layer at
a time with the same hidden states as transformers, and runs inside a training run (layer=auto)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from pifi_jax.hub.files import CheckpointReader
from pifi_jax.pifi import run as pifi_run
from pifi_jax.pifi import select
from pifi_jax.train import setup_run
from tests.conftest import FILLER, NEGATIVE, POSITIVE, load_config, tiny_overrides, write_tiny_task
from tests.test_models_decoders import tiny_decoder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = ["<pad>", "<s>", *POSITIVE, *NEGATIVE, *FILLER]
SIGNAL_LAYER = 1
FLOAT32 = dict(dtype=jnp.float32)


def write_signal_decoder(directory: Path, seed: int = 0) -> Path:
    """A random 4-layer Llama (hidden 64) in which layer 1, and only it, makes the label a dominant
    direction of its output. Saved with a word-level tokenizer over the tiny task's words.

    The label of the tiny task is whether the sentiment word is positive. Hidden dimension 0 is a
    label channel: the sentiment words' embeddings carry +-0.05 there (all of them are otherwise
    the same vector), every other embedding 0. No projection reads dimension 0 and no layer writes
    it, except in layer 1: one MLP unit (gate saturated by its bias, up reading dimension 0 with gain
    300, down writing dimension 0) amplifies the channel far above the other directions' spread.
    Layers 2 and 3 then write label-free features 30x louder, which bury it again. So the label is
    linearly readable from every layer's output, but it is concentrated in a few top principal
    components only in layer 1's.
    """
    torch.manual_seed(seed)
    hidden = 64
    config = transformers.LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=hidden,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        mlp_bias=True,
        max_position_embeddings=64,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed)
    sentiment = [VOCAB.index(w) for w in POSITIVE + NEGATIVE]
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed.copy_(torch.randn(embed.shape, generator=generator))
        embed[sentiment] = torch.randn(hidden, generator=generator)
        embed[:, 0] = 0.0
        embed[[VOCAB.index(w) for w in POSITIVE], 0] = 0.05
        embed[[VOCAB.index(w) for w in NEGATIVE], 0] = -0.05
        for index, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            for reader in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                reader.weight[:, 0] = 0.0
            attn.o_proj.weight[0] = 0.0
            mlp.down_proj.weight[0] = 0.0
            mlp.down_proj.bias[0] = 0.0
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
            if index == SIGNAL_LAYER:
                mlp.gate_proj.weight[0], mlp.gate_proj.bias[0] = 0.0, 20.0
                mlp.up_proj.weight[0], mlp.up_proj.bias[0] = 0.0, 0.0
                mlp.up_proj.weight[0, 0] = 300.0
                mlp.down_proj.weight[:, 0] = 0.0
                mlp.down_proj.weight[0, 0] = 1.0
            elif index > SIGNAL_LAYER:
                mlp.down_proj.weight.mul_(30.0)
                mlp.down_proj.bias.mul_(30.0)
    model.save_pretrained(directory)
    _word_tokenizer().save_pretrained(directory)
    return directory


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>"
    )


def _read_task(path) -> tuple[list[str], np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], np.array([int(r["label"]) for r in rows])


@pytest.fixture(scope="module")
def signal_decoder(tmp_path_factory) -> Path:
    return write_signal_decoder(tmp_path_factory.mktemp("signal_decoder"))


def test_selection_picks_the_layer_that_carries_the_label(signal_decoder, tmp_path):
    files = write_tiny_task(tmp_path, sizes=(("train", 200),), seed=3)
    texts, labels = _read_task(files["train"])
    features = select.layer_features(signal_decoder, [texts], **FLOAT32, log=print)
    assert features.shape == (4, 200, 64)
    scores = select.score_layers(features, labels, select.SelectionConfig(**FLOAT32))
    print(scores.table())
    assert scores.chosen == SIGNAL_LAYER
    others = np.delete(scores.effect, SIGNAL_LAYER)
    assert scores.effect[SIGNAL_LAYER] > 0.3 and others.max() < 0.15
    # Removing the label components at lambda = 1 leaves the probe near chance on that layer only.
    assert scores.counterfactual[1.0][SIGNAL_LAYER] < 0.7 and scores.accuracy.min() > 0.9
    cheap = select.score_layers(features, labels, select.SelectionConfig(method="corr", **FLOAT32))
    assert cheap.chosen == SIGNAL_LAYER and np.isnan(cheap.accuracy).all()


@pytest.mark.parametrize("case", ["llama", "gemma2", "falcon"])
def test_streamed_hidden_states_match_transformers(case, tmp_path, monkeypatch):
    """Layer by layer (each loaded once, in order) the pooled outputs equal transformers' own."""
    model = tiny_decoder(case, num_hidden_layers=3)
    model.save_pretrained(tmp_path)
    loaded = []
    load_layer = select.load_layer

    def recording_load_layer(path, index, **kwargs):
        loaded.append(index)
        return load_layer(path, index, **kwargs)

    monkeypatch.setattr(select, "load_layer", recording_load_layer)
    read = []
    original_get = CheckpointReader.get

    def recording_get(self, key):
        read.append(key)
        return original_get(self, key)

    monkeypatch.setattr(CheckpointReader, "get", recording_get)

    def tokenizer(texts, truncation, max_length):  # "3 14 15" -> [3, 14, 15]
        return {"input_ids": [[int(t) for t in text.split()][:max_length] for text in texts]}

    rng = np.random.default_rng(0)
    rows = [rng.integers(1, 99, size=n).tolist() for n in (5, 9, 3, 12, 7)]
    texts = [" ".join(map(str, row)) for row in rows]
    features = select.layer_features(
        tmp_path, [texts], tokenizer=tokenizer, batch_size=2, **FLOAT32, log=print
    )
    assert loaded == [0, 1, 2]
    # The embedding table and the layers' own tensors; never the final norm or the LM head.
    prefix = "transformer" if case == "falcon" else "model"
    layer_keys = "h" if case == "falcon" else "layers"
    embedding = {f"{prefix}.{'word_embeddings' if case == 'falcon' else 'embed_tokens'}.weight"}
    assert {k for k in read if not k.startswith(f"{prefix}.{layer_keys}.")} == embedding

    outputs = []
    hooks = [
        layer.register_forward_hook(
            lambda module, args, out: outputs.append(out[0] if isinstance(out, tuple) else out)
        )
        for layer in (model.transformer.h if case == "falcon" else model.model.layers)
    ]
    for i, row in enumerate(rows):
        outputs.clear()
        with torch.no_grad():
            model(input_ids=torch.tensor([row]))
        for layer, out in enumerate(outputs):
            expected = out[0].mean(0).numpy()
            np.testing.assert_allclose(features[layer, i], expected, rtol=1e-4, atol=1e-5)
    for hook in hooks:
        hook.remove()


def test_correlation_split_and_probe():
    labels = np.array([0, 1, 2] * 20)
    scores = np.random.default_rng(0).normal(size=(60, 3))
    scores[:, 0] = labels == 2  # one-vs-rest: perfectly correlated with class 2
    scores[:, 2] = 1.0  # constant
    r = select.label_correlation(scores, labels)
    assert r[0] == pytest.approx(1.0) and r[1] < 0.5 and r[2] == 0.0
    fit, held = select.stratified_split(labels, 0.3, seed=0)
    assert not set(fit) & set(held) and len(fit) + len(held) == 60
    assert [int(np.sum(labels[held] == c)) for c in range(3)] == [6, 6, 6]
    rng = np.random.default_rng(1)
    centres = 3.0 * rng.normal(size=(3, 8))  # one per class
    x = rng.normal(size=(60, 8)) + centres[labels]
    probe = select.LogisticProbe.fit(x[fit], labels[fit])
    assert probe.accuracy(x[held], labels[held]) == 1.0


def test_scores_table_csv_and_plot(tmp_path):
    scores = select.LayerScores(
        method="effect",
        effect=np.array([0.0, 0.4, 0.1]),
        correlation=np.array([0.2, 0.5, 0.3]),
        accuracy=np.array([0.9, 1.0, 0.95]),
        counterfactual={0.5: np.array([0.9, 0.9, 0.9]), 1.0: np.array([0.9, 0.6, 0.85])},
        samples=100,
    )
    assert scores.chosen == 1 and "chosen layer: 1 (by effect, 100 examples)" in scores.table()
    rows = list(csv.DictReader(open(scores.write_csv(tmp_path / "s.csv"))))
    assert [r["chosen"] for r in rows] == ["", "*", ""] and rows[1]["accuracy_minus_1R"] == "0.6"
    assert scores.plot(tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    tie = select.LayerScores("effect", np.zeros(3), np.array([0.1, 0.3, 0.2]), *[None] * 2, 1)
    assert tie.chosen == 1  # equal effects: the larger correlation wins


def test_auto_layer_is_selected_before_training_and_reused_on_resume(
    signal_decoder, tiny_bert_dir, tiny_task_files, tmp_path, monkeypatch
):
    """setup_run (what training and evaluation start with) runs the selection and builds the model
    with the chosen layer; a run directory with checkpoints keeps its choice."""
    overrides = tiny_overrides(tiny_bert_dir, tiny_task_files) + [
        f"--config.pifi.llm={signal_decoder}",
        "--config.pifi.layer=auto",
        "--config.pifi.selection_samples=96",
    ]
    config = load_config("configs/pifi.py:runlocal", overrides)
    run = setup_run(config, tmp_path)
    run.checkpointer.close()
    assert run.module.pifi.llm_layer.layer_index == SIGNAL_LAYER
    record = json.loads((tmp_path / "pifi_layer.json").read_text())
    assert record["layer"] == SIGNAL_LAYER and record["auto"] is True
    selection = tmp_path / pifi_run.SELECTION_DIR
    assert f"chosen layer: {SIGNAL_LAYER}" in (selection / "table.txt").read_text()
    assert (selection / "scores.png").is_file() and (selection / "scores.csv").is_file()

    def no_selection(*args, **kwargs):
        raise AssertionError("selection ran again")

    monkeypatch.setattr(pifi_run, "select_for_config", no_selection)
    (tmp_path / "checkpoints" / "1").mkdir(parents=True)  # as a run that has saved a step
    index, auto = pifi_run._layer_index(config, run.task, tmp_path, print)
    assert (index, auto) == (SIGNAL_LAYER, True)
