"""PiFi: the plugged layer's math, what trains and what stays frozen, the configs, the trainer hook.

Tiny random decoders (transformers, saved with save_pretrained) play the LLM and the tiny BERT of
conftest.py the SLM, so everything runs offline in seconds.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

import pifi_jax
from pifi_jax import pifi
from pifi_jax.hub.files import CheckpointReader
from pifi_jax.pifi import experiments
from pifi_jax.pifi import run as pifi_run
from pifi_jax.train import (
    Checkpointer,
    TrainState,
    default_workdir,
    make_optimizer,
    make_train_step,
    setup_run,
    split_params,
    train_and_evaluate,
)
from pifi_jax.train.objectives import Classification
from pifi_jax.train.partition import flatten, merge_params, unflatten
from tests.conftest import load_config, run_child, tiny_overrides, write_tiny_encoder
from tests.test_models_decoders import tiny_decoder

LLM_LAYERS = 3
HEAD_PATHS = {"head/dense/kernel", "head/dense/bias", "head/out_proj/kernel", "head/out_proj/bias"}


def write_tiny_llm(directory: Path, case: str = "llama", seed: int = 0) -> Path:
    """A 3-layer random decoder of the family `case`, hidden 32, saved with save_pretrained."""
    tiny_decoder(case, seed=seed, num_hidden_layers=LLM_LAYERS).save_pretrained(directory)
    return directory


def pifi_overrides(bert_dir, llm_dir, files, *extra) -> list[str]:
    """configs/pifi.py:runlocal pointed at the tiny SLM, LLM and task."""
    return [*tiny_overrides(bert_dir, files), f"--config.pifi.llm={llm_dir}", *extra]


@pytest.fixture(scope="module")
def llm_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_llms")
    return {case: write_tiny_llm(root / case, case) for case in ("llama", "gemma2", "falcon")}


def _batch(length=9, batch=3, seed=0):
    """Token ids of the tiny BERT vocabulary ([CLS] first), rows 1.. padded on the right."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 29, size=(batch, length)).astype(np.int32)
    ids[:, 0] = 2
    mask = np.ones((batch, length), np.int32)
    for row in range(1, batch):
        mask[row, length - 2 * row :] = 0
    return ids * mask, mask


# ---------------------------------------------------------------------------------------------
# The plugged layer on one token = the spec's closed form


def _rms(v, scale, eps, unit_offset=False):
    w = 1.0 + scale if unit_offset else scale
    return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + eps) * w


def _dense(v, leaf):
    return v @ np.asarray(leaf["kernel"], np.float64) + np.asarray(leaf.get("bias", 0.0))


def _gelu(v, tanh=False):
    if tanh:
        return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))
    return 0.5 * v * (1 + erf(v / np.sqrt(2)))


def _gemma2_closed_form(p, cfg, x):
    """h1 = x + post_attn_norm(W_o repeat_kv(W_v in_norm(x)));
    out = h1 + post_ff_norm(MLP(pre_ff_norm(h1))), norms scaled by (1 + w)."""

    def norm(v, name):
        return _rms(v, np.asarray(p[name]["scale"]), cfg.rms_norm_eps, unit_offset=True)

    value = _dense(norm(x, "input_layernorm"), p["self_attn"]["v_proj"])
    value = value.reshape(len(x), cfg.num_key_value_heads, cfg.head_dim)
    value = np.repeat(value, cfg.num_attention_heads // cfg.num_key_value_heads, axis=1)
    h1 = x + norm(
        _dense(value.reshape(len(x), -1), p["self_attn"]["o_proj"]), "post_attention_layernorm"
    )
    n2 = norm(h1, "pre_feedforward_layernorm")
    mlp = p["mlp"]
    hidden = _gelu(_dense(n2, mlp["gate_proj"]), tanh=True) * _dense(n2, mlp["up_proj"])
    return h1 + norm(_dense(hidden, mlp["down_proj"]), "post_feedforward_layernorm")


def _falcon_closed_form(p, cfg, x):
    """Falcon-7B (parallel attention, one key/value head): y = LN(x);
    out = x + dense(repeat(W_v y)) + MLP(y)."""
    ln = p["input_layernorm"]
    centred = x - x.mean(-1, keepdims=True)
    y = centred / np.sqrt(np.mean(centred**2, -1, keepdims=True) + cfg.layer_norm_epsilon)
    y = y * np.asarray(ln["scale"]) + np.asarray(ln["bias"])
    value = _dense(y, p["self_attention"]["query_key_value"])[:, -cfg.head_dim :]
    attn = _dense(np.tile(value, cfg.num_attention_heads), p["self_attention"]["dense"])
    mlp = _dense(_gelu(_dense(y, p["mlp"]["dense_h_to_4h"])), p["mlp"]["dense_4h_to_h"])
    return x + attn + mlp


def test_classifier_is_head_of_w_out_of_the_layer_on_w_in_of_cls(
    llm_dirs, tiny_bert_dir, monkeypatch
):
    """logits = head(W_out(layer(W_in(CLS)))) with the layer run on one token; that the general
    layer on one token is the spec's closed form is checked for Llama in tests/test_load_layer.py
    and for Gemma-2 and Falcon below. Building reads no LLM tensor but the layer's."""
    read = []
    original_get = CheckpointReader.get

    def recording_get(self, key):
        if self.directory == llm_dirs["llama"]:
            read.append(key)
        return original_get(self, key)

    monkeypatch.setattr(CheckpointReader, "get", recording_get)
    module, params = pifi.build(
        tiny_bert_dir, llm_dirs["llama"], -1, num_labels=3, layer_dtype=jnp.float32, log=print
    )
    assert read and all(key.startswith(f"model.layers.{LLM_LAYERS - 1}.") for key in read)
    layer = module.pifi.llm_layer
    assert layer.layer_index == LLM_LAYERS - 1
    ids, mask = _batch()
    logits = np.asarray(jax.jit(module.apply)({"params": params}, ids, mask))

    hidden = jax.jit(module.encoder.apply)({"params": {"bert": params["bert"]}}, ids, mask)
    plug = params["pifi"]
    x = np.asarray(hidden[:, 0]) @ np.asarray(plug["w_in"]["kernel"])  # [batch, d_llm]
    y = np.asarray(jax.jit(layer.apply)({"params": plug["llm_layer"]}, x[:, None]))[:, 0]
    z = y @ np.asarray(plug["w_out"]["kernel"])  # [batch, d_s]
    head = jax.tree.map(np.asarray, params["head"])
    expected = _dense(_gelu(_dense(z, head["dense"])), head["out_proj"])
    assert np.abs(expected).max() > 1e-3
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["gemma2", "falcon"])
def test_plugged_layer_on_one_token_is_the_closed_form(case, llm_dirs):
    """The plug-in (W_in, the general decoder layer at position 0 with an all-ones mask, W_out)
    equals W_out(closed_form(W_in x))."""
    layer, layer_params = pifi_jax.load_layer(llm_dirs[case], -1)
    plugin = pifi.PifiPlugin(layer, slm_hidden_size=24)
    x = np.random.default_rng(0).normal(size=(3, 1, 24)).astype(np.float32)
    one = np.ones((3, 1), np.int32)
    params = plugin.init(jax.random.PRNGKey(0), x, one, 0 * one)["params"]
    params = {**params, "llm_layer": layer_params}
    out = np.asarray(jax.jit(plugin.apply)({"params": params}, x, one, 0 * one))[:, 0]

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    h = x[:, 0] @ p["w_in"]["kernel"]  # [batch, d_llm]
    closed_form = _gemma2_closed_form if case == "gemma2" else _falcon_closed_form
    expected = closed_form(p["llm_layer"], layer.config, h) @ p["w_out"]["kernel"]
    assert set(params) == {"w_in", "llm_layer", "w_out"}
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_sequence_mode_masks_padding_and_uses_positions(llm_dirs, tiny_bert_dir):
    """Padding content does not matter, a padded row scores as its tokens alone (positions from
    0), and the mask does reach the plugged layer."""
    module, params = pifi.build(
        tiny_bert_dir,
        llm_dirs["llama"],
        1,
        num_labels=2,
        mode="sequence",
        pooling="mean",
        layer_dtype=jnp.float32,
        log=print,
    )
    apply = jax.jit(lambda ids, mask: module.apply({"params": params}, ids, mask))
    ids, mask = _batch()
    logits = np.asarray(apply(ids, mask))
    other_padding = np.where(mask > 0, ids, 7)
    np.testing.assert_allclose(np.asarray(apply(other_padding, mask)), logits, atol=1e-6)
    n = int(mask[2].sum())
    alone = np.asarray(apply(ids[2:3, :n], mask[2:3, :n]))[0]
    np.testing.assert_allclose(logits[2], alone, rtol=1e-5, atol=1e-6)

    plug = jax.jit(
        lambda h, mask, positions: module.pifi.apply({"params": params["pifi"]}, h, mask, positions)
    )
    h = np.random.default_rng(0).normal(size=(3, 9, 32)).astype(np.float32)
    positions = np.tile(np.arange(9), (3, 1))
    masked, unmasked = plug(h, mask, positions), plug(h, np.ones_like(mask), positions)
    assert not np.allclose(masked[2, :5], unmasked[2, :5], atol=1e-4)


def test_head_applies_dropout_before_gelu():
    head = pifi.PifiHead(hidden_size=16, num_labels=3, dropout_rate=0.5)
    x = np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32)
    variables = head.init(jax.random.PRNGKey(0), x)
    logits, state = head.apply(
        variables,
        x,
        deterministic=False,
        rngs={"dropout": jax.random.PRNGKey(1)},
        capture_intermediates=True,
    )
    p = jax.tree.map(np.asarray, variables["params"])
    dense = _dense(x, p["dense"])
    dropped = np.asarray(state["intermediates"]["Dropout_0"]["__call__"][0])
    kept = dropped != 0
    assert 0 < kept.mean() < 1
    np.testing.assert_allclose(
        dropped[kept], 2.0 * dense[kept], rtol=1e-5, atol=1e-6
    )  # inverted dropout
    np.testing.assert_allclose(logits, _dense(_gelu(dropped), p["out_proj"]), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# What trains


def test_structure_and_the_frozen_layer_through_training(llm_dirs, tiny_bert_dir, tiny_task_files):
    from tests.test_train import _param_paths_in, _train_batches

    module, params = pifi.build(tiny_bert_dir, llm_dirs["llama"], -1, num_labels=2, log=print)
    flat = flatten(params)
    assert {p.split("/")[0] for p in flat} == {"bert", "pifi", "head"}
    # W_in / W_out have no bias; the head is Linear(d_s, d_s) -> ... -> Linear(d_s, C).
    assert set(params["pifi"]["w_in"]) == set(params["pifi"]["w_out"]) == {"kernel"}
    assert params["pifi"]["w_in"]["kernel"].shape == (32, 32)
    assert flat["head/dense/kernel"].shape == (32, 32) and flat["head/dense/bias"].shape == (32,)
    assert flat["head/out_proj/kernel"].shape == (32, 2)
    assert {p for p in flat if p.startswith("head/")} == HEAD_PATHS
    layer_paths = {p for p in flat if p.startswith("pifi/llm_layer/")}
    assert {flat[p].dtype for p in layer_paths} == {jnp.dtype(jnp.bfloat16)}  # the default

    trainable, frozen = split_params(params, pifi.FROZEN_RULES)
    assert set(flatten(frozen)) == layer_paths
    config = load_config("configs/pifi.py:runlocal")
    optimizer = make_optimizer(config.optim, trainable, total_steps=3)
    state = TrainState.create(trainable, frozen, optimizer)
    opt_paths = set(_param_paths_in(state.opt_state)) - {""}
    assert opt_paths == set(flatten(trainable))  # nothing for the frozen layer

    before = {p: np.array(v) for p, v in flat.items()}
    step = jax.jit(make_train_step(Classification(module, 2, label_smoothing=0.05), optimizer))
    for batch in _train_batches(tiny_bert_dir, tiny_task_files, count=2):
        state, metrics = step(state, batch, jax.random.PRNGKey(0))
        assert np.isfinite(float(metrics["loss"]))
    for path, value in flatten(state.frozen).items():
        assert np.array_equal(np.asarray(value), before[path]), f"frozen {path} changed"
    after = flatten(state.params)
    for path in (
        "pifi/w_in/kernel",
        "pifi/w_out/kernel",
        "head/dense/kernel",
        "head/out_proj/bias",
    ):
        assert not np.array_equal(np.asarray(after[path]), before[path]), f"{path} did not train"
    assert not np.array_equal(
        np.asarray(after["bert/encoder/layer_0/attention/self/query/kernel"]),
        before["bert/encoder/layer_0/attention/self/query/kernel"],
    )


# ---------------------------------------------------------------------------------------------
# Configs and the trainer


@pytest.mark.parametrize(
    "arg",
    [
        "task=sst2,slm=bert,llm=llama3.1,method=pifi",
        "task=imdb,slm=debertav3,llm=gemma2,method=base",
        "task=snli,slm=electra,llm=falcon",
        "slm=roberta,llm=mistral0.3",
        "slm=albert,llm=qwen2_7b",
        "slm=deberta,llm=mistral0.1",
        "slm=/some/local/encoder,llm=/some/local/llm",
    ],
)
def test_config_arguments_resolve_names(arg):
    config = load_config(f"configs/pifi.py:{arg}", ["--config.pifi.layer=auto"])
    args = dict(item.split("=") for item in arg.split(","))
    assert config.model.path == pifi.resolve_slm(args["slm"])
    assert config.pifi.llm == pifi.resolve_llm(args["llm"])
    assert config.pifi.method == args.get("method", "pifi") and config.pifi.layer == "auto"
    assert config.optim.name == "adam" and config.optim.lr == 5e-5
    assert config.optim.schedule == "constant" and config.optim.weight_decay == 0.0
    assert (config.train.epochs, config.train.batch_size, config.data.max_length) == (3, 32, 100)
    assert config.optim.clip_norm == 5.0 and config.train.label_smoothing == 0.05
    assert config.seed == 2023 and config.train.early_stopping_patience == 5


def test_offline_default_and_unknown_arguments():
    config = load_config("configs/pifi.py")
    assert (config.task, config.model.path, config.pifi.llm) == (
        "rt",
        "asset:minilm",
        "asset:smollm2",
    )
    assert config.pifi.layer == "-1" and config.pifi.method == "pifi"
    assert default_workdir(config) == "runs/rt_minilm_pifi_smollm2_L-1"
    config.pifi.method = "base"
    assert default_workdir(config) == "runs/rt_minilm_base"
    from configs.pifi import get_config

    with pytest.raises(ValueError, match="unknown config argument 'model'"):
        get_config("model=bert")


def test_base_method_runs_one_step(llm_dirs, tiny_bert_dir, tiny_task_files, tmp_path):
    """The trainer's setup and one train step of method=base (method=pifi runs one step in
    tests/test_configs.py, as every shipped config does, and through the launcher below)."""
    overrides = pifi_overrides(tiny_bert_dir, llm_dirs["llama"], tiny_task_files)
    config = load_config("configs/pifi.py:runlocal,method=base", overrides)
    run = setup_run(config, tmp_path, log=print)
    run.checkpointer.close()
    batch = next(run.train_batches.batches(0))
    state, metrics = run.train_step(run.state, batch, jax.random.PRNGKey(0))
    assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))
    # The SLM and the same head as PiFi's; no W_in, layer or W_out.
    paths = set(flatten(state.params))
    assert {p.split("/")[0] for p in paths} == {"bert", "head"} and not flatten(state.frozen)
    assert {p for p in paths if p.startswith("head/")} == HEAD_PATHS
    assert json.loads((tmp_path / "pifi_layer.json").read_text()) == {"method": "base"}


@pytest.mark.parametrize(
    "family", ["albert", "deberta", pytest.param("debertav3", marks=pytest.mark.slow)]
)
def test_pifi_config_runs_a_step_with_every_other_slm_family(
    family, llm_dirs, tiny_task_files, tmp_path
):
    """configs/pifi.py:runlocal with ALBERT, DeBERTa and DeBERTa-v3 SLMs (BERT is above): the
    encoder's [CLS] output feeds W_in, the frozen layer stays frozen, the encoder trains."""
    slm_dir = write_tiny_encoder(tmp_path / family, family)
    overrides = pifi_overrides(slm_dir, llm_dirs["llama"], tiny_task_files)
    config = load_config("configs/pifi.py:runlocal", overrides)
    run = setup_run(config, tmp_path / "run", log=print)
    run.checkpointer.close()
    before_params = {p: np.array(v) for p, v in flatten(run.state.params).items()}
    before_frozen = {p: np.array(v) for p, v in flatten(run.state.frozen).items()}
    assert before_frozen and all(p.startswith("pifi/llm_layer/") for p in before_frozen)
    batch = next(run.train_batches.batches(0))
    state, metrics = run.train_step(run.state, batch, jax.random.PRNGKey(0))
    assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))
    for path, value in flatten(state.frozen).items():
        assert np.array_equal(np.asarray(value), before_frozen[path]), f"frozen {path} changed"
    after = flatten(state.params)
    encoder = {p for p in after if not p.startswith(("pifi/", "head/"))}
    assert encoder, "no SLM parameters in the trainable tree"
    moved = {p for p in encoder if not np.array_equal(np.asarray(after[p]), before_params[p])}
    # Every encoder matrix but the embeddings of tokens absent from the batch gets an update.
    assert any("attention" in p or "attn" in p for p in moved), sorted(moved)[:5]
    assert not np.array_equal(
        np.asarray(after["pifi/w_in/kernel"]), before_params["pifi/w_in/kernel"]
    )


@pytest.mark.slow
def test_pifi_composes_with_lora_on_the_slm(llm_dirs, tiny_bert_dir, tiny_task_files, tmp_path):
    """--config.peft.method=lora with configs/pifi.py: LoRA leaves in the SLM, W_in, W_out and the
    head train; the SLM's base weights and the LLM layer do not; the start equals plain PiFi."""
    from safetensors.numpy import load_file

    lora = ["--config.peft.method=lora", "--config.peft.r=4", "--config.peft.lora_alpha=8"]
    overrides = pifi_overrides(tiny_bert_dir, llm_dirs["llama"], tiny_task_files, *lora)
    config = load_config("configs/pifi.py:runlocal", overrides)
    run = setup_run(config, tmp_path / "lora", log=print)
    run.checkpointer.close()
    trainable = set(flatten(run.state.params))
    lora_paths = {p for p in trainable if p.rsplit("/", 1)[-1] in ("lora_a", "lora_b")}
    assert {p.rsplit("/", 2)[-2] for p in lora_paths} == {"query", "value"}  # bert's defaults
    assert trainable == lora_paths | HEAD_PATHS | {"pifi/w_in/kernel", "pifi/w_out/kernel"}
    frozen = set(flatten(run.state.frozen))
    assert any(p.startswith("pifi/llm_layer/") for p in frozen)
    assert "bert/encoder/layer_0/attention/self/query/kernel" in frozen

    # LoRA B starts at zero, so the logits are plain PiFi's (same seed, same W_in/W_out/head).
    plain, plain_params = pifi.build(tiny_bert_dir, llm_dirs["llama"], -1, num_labels=2, seed=2023)
    full = {**flatten(run.state.params), **flatten(run.state.frozen)}
    ids, mask = _batch()
    with_lora = run.module.apply({"params": unflatten(full)}, ids, mask)
    np.testing.assert_allclose(
        with_lora, plain.apply({"params": plain_params}, ids, mask), atol=1e-5
    )

    before = {p: np.array(v) for p, v in full.items()}
    batch = next(run.train_batches.batches(0))
    state, _ = run.train_step(run.state, batch, jax.random.PRNGKey(0))
    state, _ = run.train_step(state, batch, jax.random.PRNGKey(1))
    for path, value in flatten(state.frozen).items():
        assert np.array_equal(np.asarray(value), before[path]), f"frozen {path} changed"
    moved = {p for p, v in flatten(state.params).items() if not np.array_equal(v, before[p])}
    assert moved == trainable, sorted(trainable - moved)

    # The adapter the trainer saves at the end of a run (the builder's save_adapter, which
    # train_and_evaluate calls as for any PEFT run): the SLM's LoRA in Hugging Face PEFT's
    # format, W_in/W_out/head beside.
    out = tmp_path / "adapter"
    run.built.save_adapter(merge_params(state.params, state.frozen), out, "peft")
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert len(load_file(out / "adapter_model.safetensors")) == len(lora_paths)
    plugin = load_file(out / pifi_run.PLUGIN_WEIGHTS)
    assert set(plugin) == HEAD_PATHS | {"pifi/w_in/kernel", "pifi/w_out/kernel"}
    assert not np.array_equal(plugin["pifi/w_in/kernel"], before["pifi/w_in/kernel"])


def test_pifi_with_prompt_tuning_needs_cls_token_mode(llm_dirs, tiny_bert_dir):
    config = pifi_jax.peft.PromptTuningConfig(num_virtual_tokens=3)
    module, params = pifi.build(tiny_bert_dir, llm_dirs["llama"], -1, num_labels=2, peft=config)
    ids, mask = _batch()
    assert module.apply({"params": params}, ids, mask).shape == (3, 2)
    with pytest.raises(ValueError, match="pooling='cls' and mode='token'"):
        pifi.build(tiny_bert_dir, llm_dirs["llama"], -1, num_labels=2, peft=config, pooling="mean")


@pytest.fixture(scope="module")
def launched_run(llm_dirs, tiny_bert_dir, tiny_task_files, tmp_path_factory) -> Path:
    """configs/pifi.py:runlocal (the last layer of the tiny Llama) through `python -m launch.train`."""
    workdir = tmp_path_factory.mktemp("pifi_run")
    command = [
        sys.executable,
        "-m",
        "launch.train",
        "--config=configs/pifi.py:runlocal",
        f"--workdir={workdir}",
        *pifi_overrides(tiny_bert_dir, llm_dirs["llama"], tiny_task_files),
    ]
    run = run_child(command)
    assert "PiFi: layer 2 of 3" in run.stdout
    return workdir


def test_launcher_run_records_the_layer_and_does_not_save_it(
    launched_run, llm_dirs, tiny_task_files
):
    from tests.run_checks import assert_classification_results

    results = json.loads((launched_run / "results.json").read_text())
    assert results["steps"] == 2
    # the reported accuracy is that of the run's predictions, one per row of the test file
    assert_classification_results(launched_run, results, "test", tiny_task_files["test"])
    record = json.loads((launched_run / "pifi_layer.json").read_text())
    _, layer_params = pifi_jax.load_layer(
        llm_dirs["llama"], -1, dtype=jnp.float32, param_dtype=jnp.bfloat16
    )
    assert record == {
        "method": "pifi",
        "llm": str(llm_dirs["llama"]),
        "layer": 2,
        "num_layers": LLM_LAYERS,
        "auto": False,
        "dtype": "bfloat16",
        "sha256": pifi.layer_fingerprint(layer_params),
    }
    ckpt = Checkpointer(launched_run / "checkpoints")
    try:
        state, _ = ckpt.restore(None)
    finally:
        ckpt.close()
    saved = set(flatten(state["params"]))
    assert "pifi/w_in/kernel" in saved and "head/out_proj/kernel" in saved
    assert not [p for p in saved if "llm_layer" in p]


def test_launch_predict_runs_the_pifi_model_of_the_run(launched_run, tiny_task_files, tmp_path):
    """`python -m launch.predict` on the PiFi run: the LLM layer is loaded again (as
    pifi_layer.json pins it) and the labels are those the run's evaluation predicted."""
    out = tmp_path / "out.csv"
    command = [sys.executable, "-m", "launch.predict", f"--workdir={launched_run}"]
    command += [f"--input={tiny_task_files['test']}", f"--output={out}", "--batch_size=8"]
    run = run_child(command)
    assert "best (step 2) checkpoint" in run.stderr
    written = list(csv.DictReader(open(out, encoding="utf-8")))
    expected = [json.loads(line) for line in open(launched_run / "predictions_test.jsonl")]
    names = ["negative", "positive"]  # task sst2's label names
    assert [row["label"] for row in written] == [names[r["prediction"]] for r in expected]
    assert set(written[0]) == {"text", "label", "p:negative", "p:positive"}


@pytest.mark.parametrize(
    "change, message",
    [
        (["--config.pifi.layer=0"], "trained with layer 2 of .* plugs in layer 0 of"),
        (["--config.pifi.llm={other}"], r"layer 2 of .*llama .* plugs in layer 2 of .*other"),
        (["--config.pifi.method=base"], "plugs in method 'base'"),
    ],
)
def test_resume_against_a_different_layer_is_refused(
    launched_run, llm_dirs, tiny_bert_dir, tiny_task_files, change, message, tmp_path_factory
):
    other = tmp_path_factory.getbasetemp() / "other_llama"
    if not other.exists():
        write_tiny_llm(other, seed=1)  # same shapes, other weights
    change = [c.format(other=other) for c in change]
    overrides = pifi_overrides(tiny_bert_dir, llm_dirs["llama"], tiny_task_files, *change)
    config = load_config("configs/pifi.py:runlocal", overrides)
    config_before = (launched_run / "config.json").read_text()
    with pytest.raises(ValueError, match=message):
        train_and_evaluate(config, launched_run)
    assert json.loads((launched_run / "pifi_layer.json").read_text())["layer"] == 2  # untouched
    assert (launched_run / "config.json").read_text() == config_before  # the old run's config


@pytest.mark.slow
def test_experiments_launcher_compares_base_and_pifi_on_the_config_task(
    llm_dirs, tiny_bert_dir, tiny_task_files, tmp_path
):
    """README's main job in miniature: `python -m launch.experiments` with no --tasks trains base
    and PiFi on config.task and prints their test accuracy side by side."""
    out = tmp_path / "experiments"
    command = [
        sys.executable,
        "-m",
        "launch.experiments",
        "--config=configs/pifi.py:runlocal",
        f"--out={out}",
        *pifi_overrides(tiny_bert_dir, llm_dirs["llama"], tiny_task_files),
    ]
    run = run_child(command)
    for method in ("base", "pifi"):
        results = json.loads((out / "sst2" / method / "seed2023" / "results.json").read_text())
        assert results["steps"] == 2
    summary = (out / "summary.md").read_text()
    assert summary in run.stdout and "| sst2 | 1/1 |" in summary


def test_experiment_grid_scores_generation_tasks_by_their_metrics(tmp_path, monkeypatch):
    """A generation task's grid reports ROUGE-L and BLEU (percentages already), QA F1 and EM;
    tasks scored differently are not mixed in one table."""
    from pifi_jax.train import loop

    assert experiments.metrics_of("rt") == ("accuracy", "f1_macro")
    assert experiments.metrics_of("sciq_question") == ("rougeL", "bleu")
    assert experiments.metrics_of("squad_spans") == ("f1", "exact_match")

    def fake_train(config, workdir):
        rouge = 40.0 + 2.0 * (config.pifi.method == "pifi") + config.seed
        results = {"test/rougeL": rouge, "test/bleu": rouge / 2}
        Path(workdir).mkdir(parents=True)
        (Path(workdir) / "results.json").write_text(json.dumps(results))
        return results

    monkeypatch.setattr(loop, "train_and_evaluate", fake_train)
    config = load_config("configs/pifi.py:task=sciq_question")
    rows = experiments.run_grid(config, ["sciq_question"], [1, 3], tmp_path, log=print)
    assert [r["rougeL"] for r in rows] == [41.0, 43.0, 43.0, 45.0]
    table = experiments.summarize(rows)
    text = experiments.markdown(table)
    assert "| task | seeds | base rougeL | PiFi rougeL | Δ rougeL | base bleu | PiFi bleu |" in text
    assert "| sciq_question | 2/2 | 42.00 ± 1.41 | 44.00 ± 1.41 | 2.00 | 21.00 ± 0.71 |" in text
    with pytest.raises(ValueError, match="scored alike"):
        experiments.run_grid(config, ["rt", "sciq_question"], [1], tmp_path / "mixed", log=print)


def test_experiment_grid_reuses_finished_runs_and_tabulates(tmp_path, monkeypatch):
    from pifi_jax.train import loop

    calls = []

    def fake_train(config, workdir):
        calls.append((config.task, config.pifi.method, config.seed))
        accuracy = 0.8 + 0.1 * (config.pifi.method == "pifi") + 0.01 * (config.seed - 1)
        results = {"test/accuracy": accuracy, "test/f1_macro": accuracy - 0.05}
        Path(workdir).mkdir(parents=True)
        (Path(workdir) / "results.json").write_text(json.dumps(results))
        return results

    monkeypatch.setattr(loop, "train_and_evaluate", fake_train)
    config = load_config("configs/pifi.py:slm=bert")
    rows = experiments.run_grid(config, ["sst2", "rt"], [1, 2, 3], tmp_path, log=print)
    assert len(calls) == len(rows) == 12
    again = experiments.run_grid(config, ["sst2", "rt"], [1, 2, 3], tmp_path, log=print)
    assert len(calls) == 12 and again == rows  # finished runs are read back, not retrained
    table = experiments.summarize(rows, "bert")
    sst2 = table[0]
    assert sst2["task"] == "sst2" and sst2["base_n"] == sst2["pifi_n"] == 3
    np.testing.assert_allclose(
        [sst2["base_accuracy_mean"], sst2["base_accuracy_std"], sst2["delta_accuracy"]],
        [81.0, 1.0, 10.0],
    )
    assert (sst2["paper_base"], sst2["paper_pifi"]) == (89.41, 91.50)
    assert table[-1]["task"] == "average" and np.isnan(table[-1]["paper_base"])  # rt: no paper
    path = experiments.write_reports(rows, table, tmp_path, "bert")
    text = path.read_text()
    assert "| sst2 | 3/3 | 81.00 ± 1.00 | 91.00 ± 1.00 | 10.00 |" in text
    assert "| rt |" in text and "89.41" in text
    assert (tmp_path / "summary.csv").is_file() and (tmp_path / "runs.csv").is_file()
