"""Sequence classification with the decoder families against transformers (PyTorch).

`from_pretrained(path, task="classification", num_labels=N)` on a decoder is transformers'
`<Family>ForSequenceClassification`: a bias-free `score` head on the last real token of each row.
Covered: logits of tiny random models of every family (right padding; left padding for llama),
scan_layers / remat, save_pretrained read back by transformers, a causal-LM checkpoint loaded as a
classifier (new head, lm_head dropped), LoRA exported to Hugging Face PEFT with the head, a train
step, and a whole run of configs/classify.py:runlocal on a tiny Llama.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pifi_jax
from pifi_jax import peft
from pifi_jax.train import TrainState, make_train_step, split_params, train_and_evaluate
from pifi_jax.train.objectives import Classification
from pifi_jax.train.partition import flatten, unflatten
from tests.conftest import load_config, tiny_overrides

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.test_models_decoders import CASES  # noqa: E402

FAMILIES = ("llama", "mistral", "qwen2", "gemma2", "falcon", "gpt2")
NUM_LABELS, PAD = 3, 0
# Tiny shapes: XLA's CPU backend compiles several times faster without optimisation.
FAST_COMPILE = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None


def _quiet(*_):
    pass


def tiny_classifier(case: str, seed: int = 0):
    """A random transformers `<Family>ForSequenceClassification` of test_models_decoders' CASES,
    pad id 0, norms and biases off their initialisation, a score head large enough that the
    logits differ well beyond the tolerance."""
    torch.manual_seed(seed)
    cfg_name, kwargs = CASES[case]
    config = getattr(transformers, cfg_name)(**kwargs, num_labels=NUM_LABELS, pad_token_id=PAD)
    model = transformers.AutoModelForSequenceClassification.from_config(
        config, attn_implementation="eager"
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
        model.score.weight.normal_(0.0, 1.0)
    return model.eval()


def padded_batch(batch: int = 3, length: int = 10, left: bool = False, seed: int = 0):
    """input_ids / attention_mask, row b 3 * b tokens shorter, padded with PAD on the right or
    the left; real tokens are never PAD (transformers finds the last one by its id)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 99, size=(batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    for b in range(batch):
        pad = 3 * b
        padding = slice(0, pad) if left else slice(length - pad, length)
        mask[b, padding] = 0
        ids[b, padding] = PAD
    return ids, mask


def torch_logits(model, ids, mask, position_ids=None) -> np.ndarray:
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            position_ids=None if position_ids is None else torch.as_tensor(position_ids),
        )
    return out.logits.numpy()


def ours(module, params, ids, mask) -> np.ndarray:
    # token_type_ids as the trainer's batches carry them: accepted and ignored.
    logits = module.apply(
        {"params": params}, input_ids=ids, attention_mask=mask, token_type_ids=np.zeros_like(ids)
    )
    assert logits.dtype == jnp.float32 and logits.shape == (ids.shape[0], NUM_LABELS)
    return np.asarray(logits)


@pytest.mark.parametrize("case", FAMILIES)
def test_logits_match_transformers_and_save_pretrained_round_trips(case, tmp_path):
    model = tiny_classifier(case)
    model.save_pretrained(tmp_path / "src")
    module, params = pifi_jax.from_pretrained(
        tmp_path / "src", task="classification", num_labels=NUM_LABELS, log=_quiet
    )
    assert set(params) == {module.base_name, "score"} and "kernel" in params["score"]
    ids, mask = padded_batch()
    theirs = torch_logits(model, ids, mask)
    assert np.abs(theirs).max() > 0.5  # not a comparison of near-zero numbers
    logits = ours(module, params, ids, mask)
    np.testing.assert_allclose(logits, theirs, atol=1e-5)

    pifi_jax.save_pretrained(module, params, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == [type(model).__name__]
    assert len(config["id2label"]) == NUM_LABELS
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "out", attn_implementation="eager"
    ).eval()
    assert type(reloaded) is type(model)
    np.testing.assert_allclose(torch_logits(reloaded, ids, mask), logits, atol=1e-5)


def test_left_padding_scores_the_last_token_as_right_padding_does(tmp_path):
    model = tiny_classifier("llama")
    model.save_pretrained(tmp_path)
    module, params = pifi_jax.from_pretrained(
        tmp_path, task="classification", num_labels=NUM_LABELS, log=_quiet
    )
    ids, mask = padded_batch(left=True)
    logits = ours(module, params, ids, mask)
    # Our positions come from the mask; transformers needs them given to number rows the same.
    position_ids = np.where(mask > 0, np.cumsum(mask, axis=1) - 1, 1)
    np.testing.assert_allclose(logits, torch_logits(model, ids, mask, position_ids), atol=1e-5)
    # The same rows padded on the right: the same logits.
    right_ids, right_mask = np.full_like(ids, PAD), np.zeros_like(mask)
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        right_ids[row, :n], right_mask[row, :n] = ids[row, mask[row] > 0], 1
    np.testing.assert_allclose(ours(module, params, right_ids, right_mask), logits, atol=1e-5)


def test_scanned_and_rematerialised_stacks_give_the_same_logits_and_gradients(tmp_path):
    tiny_classifier("gemma2").save_pretrained(tmp_path)  # sliding and global layers alternate
    ids, mask = padded_batch()
    labels = jnp.arange(ids.shape[0]) % NUM_LABELS

    def loss_and_score_grad(scan_layers, remat_policy):
        module, params = pifi_jax.from_pretrained(
            tmp_path,
            task="classification",
            num_labels=NUM_LABELS,
            scan_layers=scan_layers,
            remat_policy=remat_policy,
            log=_quiet,
        )

        def loss(p):
            logits = module.apply({"params": p}, ids, mask)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        value, grads = jax.jit(jax.value_and_grad(loss), compiler_options=FAST_COMPILE)(params)
        return value, grads["score"]["kernel"], params

    plain = loss_and_score_grad(False, "none")
    scanned = loss_and_score_grad(True, "dots")
    assert scanned[2]["model"]["layers"]["mlp"]["up_proj"]["kernel"].shape[0] == 2  # stacked
    np.testing.assert_allclose(scanned[0], plain[0], atol=1e-5)
    np.testing.assert_allclose(scanned[1], plain[1], atol=1e-5)


def test_causal_lm_checkpoint_loads_as_a_classifier_with_a_new_head(tmp_path):
    model = transformers.AutoModelForCausalLM.from_config(
        getattr(transformers, CASES["llama"][0])(**CASES["llama"][1], pad_token_id=PAD)
    )
    model.save_pretrained(tmp_path / "lm")  # untied: it holds an lm_head.weight
    logged = []
    module, params = pifi_jax.from_pretrained(
        tmp_path / "lm", task="classification", num_labels=NUM_LABELS, log=logged.append
    )
    assert any("newly initialised" in line and "score/kernel" in line for line in logged)
    assert "lm_head" not in params and params["score"]["kernel"].shape == (32, NUM_LABELS)
    _, lm_params = pifi_jax.from_pretrained(tmp_path / "lm", task="causal_lm", log=_quiet)
    for path, value in flatten(lm_params["model"]).items():
        np.testing.assert_array_equal(flatten(params["model"])[path], value)
    # A classifier checkpoint's score head is in turn optional to the bare stack.
    pifi_jax.save_pretrained(module, params, tmp_path / "cls")
    _, bare = pifi_jax.from_pretrained(tmp_path / "cls", task="decoder", log=_quiet)
    assert set(bare) == {"model"}


def test_lora_trains_the_score_head_and_exports_it_to_hf_peft(tmp_path):
    hf_peft = pytest.importorskip("peft")
    tiny_classifier("llama").save_pretrained(tmp_path / "base")
    module, params = pifi_jax.from_pretrained(
        tmp_path / "base",
        task="classification",
        num_labels=NUM_LABELS,
        peft=peft.LoraConfig(r=4, lora_alpha=8),
        log=_quiet,
    )
    mask_tree = flatten(peft.trainable_mask(module, params))
    assert mask_tree["score/kernel"] and mask_tree["model/layers_0/self_attn/q_proj/lora_b"]
    assert not mask_tree["model/layers_0/self_attn/q_proj/kernel"]
    # A trained-looking adapter and head, so nothing passes by identity.
    flat = flatten(params)
    rng = np.random.default_rng(1)
    for path, value in flat.items():
        if path.endswith(("lora_a", "lora_b")) or path == "score/kernel":
            flat[path] = np.asarray(value) + 0.5 * rng.standard_normal(value.shape, np.float32)
    params = unflatten(flat)
    peft.save_adapter(module, params, tmp_path / "adapter", format="peft")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS"

    base = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "base", attn_implementation="eager"
    )
    loaded = hf_peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids, mask = padded_batch()
    logits = ours(module, params, ids, mask)
    # float32 rounding on logits up to ~12 (LoRA B perturbed by 0.5): relative as well.
    np.testing.assert_allclose(torch_logits(loaded, ids, mask), logits, atol=1e-5, rtol=1e-5)
    # And back: the adapter file loads into a fresh PEFT model of ours.
    fresh, fresh_params = pifi_jax.from_pretrained(
        tmp_path / "base",
        task="classification",
        num_labels=NUM_LABELS,
        peft=peft.read_adapter_config(tmp_path / "adapter"),
        log=_quiet,
    )
    fresh_params = peft.load_adapter(fresh, fresh_params, tmp_path / "adapter")
    np.testing.assert_allclose(ours(fresh, fresh_params, ids, mask), logits, atol=1e-6)


def test_one_train_step_under_lora_changes_the_head(tiny_llama_dir):
    module, params = pifi_jax.from_pretrained(
        tiny_llama_dir, task="classification", num_labels=2, peft=peft.LoraConfig(r=2), log=_quiet
    )
    trainable, frozen = split_params(params, peft.trainable_rules(module, params))
    assert "score/kernel" in flatten(trainable) and "score/kernel" not in flatten(frozen)
    optimizer = optax.sgd(0.5)
    state = TrainState.create(trainable, frozen, optimizer)
    ids, mask = padded_batch(batch=4)
    batch = {
        "input_ids": jnp.asarray(ids % 16),  # inside the tiny tokenizer's vocabulary
        "attention_mask": jnp.asarray(mask),
        "token_type_ids": jnp.zeros_like(ids),
        "labels": jnp.asarray([0, 1, 1, 0]),
        "weights": jnp.ones((4,), jnp.float32),
    }
    step = jax.jit(
        make_train_step(Classification(module, num_labels=2), optimizer),
        compiler_options=FAST_COMPILE,
    )
    new_state, metrics = step(state, batch, jax.random.PRNGKey(0))
    assert np.isfinite(float(metrics["loss"]))
    before, after = flatten(state.params), flatten(new_state.params)
    assert not np.array_equal(after["score/kernel"], before["score/kernel"])
    assert not np.array_equal(
        after["model/layers_1/self_attn/v_proj/lora_b"],
        before["model/layers_1/self_attn/v_proj/lora_b"],
    )


def test_classify_runlocal_trains_a_tiny_llama(tiny_llama_dir, tiny_task_files, tmp_path):
    config = load_config(
        "configs/classify.py:runlocal", tiny_overrides(tiny_llama_dir, tiny_task_files)
    )
    results = train_and_evaluate(config, tmp_path / "run")
    assert results["steps"] == 2
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == results
    assert 0.0 <= results["test/accuracy"] <= 1.0
