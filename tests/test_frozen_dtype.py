"""Frozen weights read straight into their storage dtype (from_pretrained's frozen_dtype, the
trainer's model.frozen_dtype): the same tensors as loading in float32 and casting what is frozen
afterwards, without the float32 copy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pifi_jax
from pifi_jax import partition
from pifi_jax.hub import convert
from pifi_jax.hub.pretrained import _flatten

CASES = {
    "lora": ("llama", "causal_lm", pifi_jax.peft.LoraConfig(r=2, target_modules=["q_proj"])),
    "bitfit": ("bert", "classification", pifi_jax.peft.BitFitConfig()),
    "dora": ("llama", "causal_lm", pifi_jax.peft.DoraConfig(r=2, target_modules=["v_proj"])),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_frozen_weights_load_in_their_dtype_equal_to_casting_after(
    case, tiny_llama_dir, tiny_bert_dir, monkeypatch
):
    family, task, cfg = CASES[case]
    path = str(tiny_llama_dir if family == "llama" else tiny_bert_dir)
    quiet = dict(task=task, peft=cfg, log=lambda s: None)
    module, full = pifi_jax.from_pretrained(path, **quiet)
    rules = pifi_jax.peft.trainable_rules(module, full)
    labels = partition.label_leaves(full, rules)
    # what the loader places: each tensor as it is read, already in its storage dtype
    placed = []
    real_put = jax.device_put
    monkeypatch.setattr(
        convert.jax, "device_put", lambda x, *a, **k: placed.append(x.dtype) or real_put(x, *a, **k)
    )
    _, direct = pifi_jax.from_pretrained(path, frozen_dtype=jnp.bfloat16, **quiet)
    monkeypatch.undo()
    got, want = _flatten(direct), _flatten(full)
    assert set(got) == set(want)
    frozen = [p for p in want if labels[p] == "frozen"]
    trained = [p for p in want if labels[p] == "trainable"]
    assert frozen and trained
    for p in frozen:
        assert got[p].dtype == jnp.bfloat16, p
        if case != "dora" or "lora_magnitude" not in p:
            np.testing.assert_array_equal(
                np.asarray(got[p]), np.asarray(want[p].astype(jnp.bfloat16)), err_msg=p
            )
    for p in trained:
        assert got[p].dtype == jnp.float32, p
        if case == "dora" and p.endswith("lora_magnitude"):
            # the magnitude is the norm of the weight it starts from, here the bfloat16 one
            w = np.asarray(got[p.replace("lora_magnitude", "kernel")], np.float32)
            np.testing.assert_allclose(np.asarray(got[p]), np.linalg.norm(w, axis=0), rtol=1e-5)
        else:
            np.testing.assert_array_equal(np.asarray(got[p]), np.asarray(want[p]), err_msg=p)
    # LoRA and DoRA train no loaded tensor: all were read as bfloat16; BitFit's biases in float32
    kinds = {np.dtype(d) for d in placed}
    assert kinds == (
        {np.dtype(jnp.bfloat16)}
        if case != "bitfit"
        else {np.dtype(jnp.bfloat16), np.dtype(np.float32)}
    )


def test_explicit_rules_without_peft_and_nothing_frozen_by_default(tiny_bert_dir):
    path = str(tiny_bert_dir)
    rules = [(r".*/bias", "trainable"), (r"classifier/.*", "trainable"), (".*", "frozen")]
    _, params = pifi_jax.from_pretrained(
        path, frozen_dtype=jnp.bfloat16, trainable_rules=rules, log=lambda s: None
    )
    for p, v in _flatten(params).items():
        trains = p.endswith("/bias") or p.startswith("classifier/")
        assert v.dtype == (jnp.float32 if trains else jnp.bfloat16), p
    # no rules, no PEFT: everything trains, so nothing is stored in the frozen dtype
    _, params = pifi_jax.from_pretrained(path, frozen_dtype=jnp.bfloat16, log=lambda s: None)
    assert {v.dtype for v in _flatten(params).values()} == {jnp.dtype(jnp.float32)}


def test_the_trainer_builds_lora_with_bfloat16_frozen_weights(
    tiny_bert_dir, tiny_task_files, monkeypatch
):
    from pifi_jax.train import loop
    from tests.conftest import load_config, tiny_overrides

    config = load_config(
        "configs/classify.py:runlocal",
        [*tiny_overrides(tiny_bert_dir, tiny_task_files), "--config.peft.method=lora",
         "--config.model.frozen_dtype=bfloat16"],
    )  # fmt: skip
    placed = []
    real_put = jax.device_put
    monkeypatch.setattr(
        convert.jax, "device_put", lambda x, *a, **k: placed.append(x.dtype) or real_put(x, *a, **k)
    )
    setup = loop.build_model(config, loop.model_context(config), None, log=lambda s: None)
    monkeypatch.undo()
    kinds = [np.dtype(d) for d in placed]
    # every frozen tensor was read as bfloat16; float32 only for what trains (the head)
    assert kinds.count(np.dtype(jnp.bfloat16)) == len(_flatten(setup.frozen))
    assert kinds.count(np.dtype(np.float32)) <= len(_flatten(setup.trainable))
    assert {v.dtype for v in _flatten(setup.frozen).values()} == {jnp.dtype(jnp.bfloat16)}
    assert {v.dtype for v in _flatten(setup.trainable).values()} == {jnp.dtype(jnp.float32)}
