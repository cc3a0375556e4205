"""Sparse gradients of IST's active layers (pifi_jax.ist.sparse_grad): the same gradients as
plain differentiation on the active layers and zeros on the inactive layers' tapped weights, for
LoRA, DoRA and bottleneck adapters on a decoder and an encoder (with LoRA dropout too), and less
compiled memory than plain differentiation by at least most of the inactive layers' inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pifi_jax
from pifi_jax import partition, peft
from pifi_jax.ist import layer_index_of
from pifi_jax.ist.plugin import layer_free_path
from pifi_jax.ist.sparse_grad import active_slots, sparse_value_and_grad
from pifi_jax.models import registry
from pifi_jax.train.objectives import CausalLM, Classification
from tests.conftest import write_tiny_decoder, write_tiny_encoder

LAYERS = 4
ALL_LORA = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


def _quiet(*_):
    pass


def _group_of_weight(trainable):
    flat = partition.flatten(trainable)

    def group_of(path):
        leaf = flat.get(path)
        if leaf is None or leaf.ndim != 2 or leaf.shape[0] <= leaf.shape[1]:
            return None
        return layer_index_of(path)

    return group_of


def _perturbed(params):
    rng = np.random.default_rng(3)
    return jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(np.float32), params)


CASES = {
    "lora-llama": ("llama", peft.LoraConfig(r=2, lora_alpha=4, target_modules=ALL_LORA)),
    "lora-dropout-llama": (
        "llama",
        peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.3, target_modules=ALL_LORA),
    ),
    "dora-llama": ("llama", peft.DoraConfig(r=2, lora_alpha=4)),
    "adapter-llama": ("llama", peft.AdapterConfig(kind="houlsby", bottleneck_size=8)),
    "lora-gpt2": ("gpt2", peft.LoraConfig(r=2, lora_alpha=4)),
    "lora-bert": ("bert", peft.LoraConfig(r=2, lora_alpha=4)),
    "adapter-bert": ("bert", peft.AdapterConfig(kind="pfeiffer", bottleneck_size=8)),
}


SLOW_CASES = {
    "lora-gpt2",
    "adapter-bert",
    "lora-bert",
    "lora-llama",
    "lora-dropout-llama",
}  # (test_ist runs IST on an encoder)


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=[pytest.mark.slow] if c in SLOW_CASES else []) for c in CASES]
)
def test_sparse_gradients_equal_plain_ones_on_the_active_layers(tmp_path, case):
    family, config = CASES[case]
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(4, 12, size=(3, 9)), jnp.int32)  # ids in every tiny vocab
    mask = jnp.asarray(np.arange(9)[None] < np.array([[9], [6], [8]]), jnp.int32)
    if family == "bert":
        path = write_tiny_encoder(tmp_path, family, layers=LAYERS)
        module, params = pifi_jax.from_pretrained(
            path, task="classification", num_labels=3, peft=config, log=_quiet
        )
        objective = Classification(module, num_labels=3)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": jnp.array([0, 2, 1])}
        batch["weights"] = jnp.ones(3)
    else:
        path = write_tiny_decoder(tmp_path, family, layers=LAYERS)
        module, params = pifi_jax.from_pretrained(path, task="causal_lm", peft=config, log=_quiet)
        objective = CausalLM(module, tokenizer=None)
        batch = {"input_ids": ids, "attention_mask": mask, "loss_mask": mask}
    trainable, frozen = partition.split_params(
        _perturbed(params), peft.trainable_rules(module, params)
    )
    group_of = _group_of_weight(trainable)
    tapped = [p for p in partition.flatten(trainable) if group_of(p) is not None]
    assert len(tapped) >= LAYERS
    key = jax.random.PRNGKey(5)
    (loss, _), plain = jax.value_and_grad(objective.loss_fn, has_aux=True)(
        trainable, frozen, batch, key
    )
    sparse_fn = sparse_value_and_grad(objective.loss_fn, group_of, layer_free_path, 2)
    for active in ([False, True, False, True], [True, True, False, False]):
        active = jnp.asarray(active)
        (sparse_loss, _), sparse = jax.jit(
            lambda t, f, b, a: sparse_fn(t, f, b, key, active=a)  # noqa: B023
        )(trainable, frozen, batch, active)
        np.testing.assert_allclose(float(sparse_loss), float(loss), rtol=1e-6)
        flat_plain, flat_sparse = partition.flatten(plain), partition.flatten(sparse)
        assert flat_plain.keys() == flat_sparse.keys()
        for path, want in flat_plain.items():
            got = np.asarray(flat_sparse[path])
            if path in tapped and not active[group_of(path)]:
                assert not got.any(), path  # an inactive layer's tapped weight: exactly zero
                assert np.abs(np.asarray(want)).max() > 0, path  # (plain AD does form it)
            else:
                np.testing.assert_allclose(got, np.asarray(want), atol=2e-6, rtol=1e-5)


def test_slots_number_the_active_layers_in_order():
    slots, group_of_slot = active_slots(jnp.asarray([False, True, False, True, True]), 3)
    assert slots.tolist() == [3, 0, 3, 1, 2]
    assert group_of_slot.tolist() == [1, 3, 4]


def _memory(sparse: bool, layers: int = 6, n_update: int = 1) -> int:
    hf = dict(
        model_type="llama",
        vocab_size=64,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
    )
    module = registry.family_for("llama").build(
        registry.config_from_hf(hf), "causal_lm", 0, jnp.float32, jnp.float32
    )
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LORA)
    ids = jnp.zeros((1, 8), jnp.int32)
    key = jax.random.PRNGKey(0)
    shapes = partition.flatten(jax.eval_shape(lambda k: module.init(k, ids)["params"], key))
    module = peft.PeftModel(module, peft.make_plan(config, module.config, shapes), config)
    params = jax.eval_shape(lambda k: module.init(k, ids)["params"], key)
    trainable, frozen = partition.split_params(params, peft.trainable_rules(module, params))
    objective = CausalLM(module, tokenizer=None)
    batch = {
        n: jax.ShapeDtypeStruct((4, 128), jnp.int32)
        for n in ("input_ids", "attention_mask", "loss_mask")
    }
    active = jax.ShapeDtypeStruct((layers,), jnp.bool_)
    if sparse:
        fn = sparse_value_and_grad(
            objective.loss_fn, _group_of_weight(trainable), layer_free_path, n_update
        )
    else:
        plain = jax.value_and_grad(objective.loss_fn, has_aux=True)

        def fn(t, f, b, k, active):
            del active
            return plain(t, f, b, k)

    def grads(t, f, b, a):
        return fn(t, f, b, key, active=a)[1]

    compiled = jax.jit(grads).lower(trainable, frozen, batch, active).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_inactive_layers_keep_no_inputs_for_their_weight_gradients():
    """Plain differentiation keeps, per layer, the three LoRA-A inputs ([4, 128] tokens x (128,
    128, 384) floats: the normed input of q/k/v and of up, and down's input); sparse gradients keep
    them for the one active layer only, so the 5 others' (5 x 640 floats per token) are saved."""
    inputs_per_layer = 4 * 128 * (128 + 128 + 384) * 4
    saved = _memory(sparse=False) - _memory(sparse=True)
    assert saved >= 0.8 * 5 * inputs_per_layer, (saved, inputs_per_layer)


def test_sparse_and_dense_ist_runs_make_the_same_updates_with_accumulation(
    tmp_path, tiny_pair_files
):
    """The whole trainer, IST with gradient accumulation over 2 micro-batches: sparse gradients
    and differentiating every layer give the same parameters after 4 steps (to float rounding)."""
    from pifi_jax.train.loop import _global, setup_run
    from tests.conftest import load_config

    model = write_tiny_decoder(tmp_path / "model", "llama", layers=LAYERS)
    params = {}
    for sparse in (True, False):
        overrides = [f"--config.model.path={model}", "--config.task=pairs"]
        overrides += [f"--config.data.data_files.{s}={p}" for s, p in tiny_pair_files.items()]
        overrides += ["--config.ist.mode=ist", "--config.ist.n_update=2"]
        overrides += ["--config.ist.interval=2", "--config.ist.probe_batch_size=4"]
        overrides += ["--config.train.grad_accum_steps=2", "--config.train.batch_size=4"]
        overrides += [f"--config.ist.sparse_grad={sparse}", "--config.optim.lr=0.05"]
        run = setup_run(
            load_config("configs/causal_lm.py:runlocal", overrides),
            tmp_path / f"run_{sparse}",
            log=_quiet,
        )
        start = partition.flatten(jax.device_get(run.state.params))  # (the steps donate it)
        state, rng = run.state, jax.random.PRNGKey(0)
        probe = iter(run.periodic_batches.batches(0))
        batches = iter(run.train_batches.batches(0))
        for step in range(4):
            if step and step % 2 == 0:
                probe_batch = _global(next(probe), run.batch_sharding)
                extra, _ = run.periodic_step(state, probe_batch, jax.random.fold_in(rng, step))
                state = state.replace(extra=extra)
            state, _ = run.train_step(state, _global(next(batches), run.batch_sharding), rng)
        params[sparse] = partition.flatten(jax.device_get(state.params))
    moved = 0
    for path, value in params[True].items():
        np.testing.assert_allclose(value, params[False][path], atol=1e-5, rtol=1e-4)
        moved += "lora_a" in path and not np.array_equal(value, start[path])
    assert moved
