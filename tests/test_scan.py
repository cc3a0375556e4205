"""Scanned layer stacks and rematerialisation: the same numbers as the unrolled stack.

A scanned model (`scan_layers=True`) holds each per-layer tensor once, stacked along a leading
layers axis, and runs one layer module under nn.scan; loading stacks the checkpoint's per-layer
tensors and saving unstacks them. Scan and remat change the order of nothing but XLA's fusion,
so logits and gradients agree with the unrolled stack to float32 rounding (TOL).
"""

import jax
import numpy as np
import pytest

import pifi_jax
from pifi_jax import parallel
from pifi_jax.hub import convert
from pifi_jax.hub.pretrained import _flatten
from pifi_jax.models.stack import REMAT_POLICIES
from pifi_jax.train.metrics import mean_next_token_loss
from tests.test_models_decoders import padded_batch, tiny_decoder, torch_forward

transformers = pytest.importorskip("transformers")

LAYERS = 3
TOL = 1e-5


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    model = tiny_decoder("llama", num_hidden_layers=LAYERS)
    directory = tmp_path_factory.mktemp("llama")
    model.save_pretrained(directory)
    return model, directory


def load(directory, **kw):
    return pifi_jax.from_pretrained(directory, task="causal_lm", log=lambda *_: None, **kw)


@pytest.fixture(scope="module")
def scanned_llama(llama_dir):
    return load(llama_dir[1], scan_layers=True)


def logits_and_gradients(module, params, seed=0):
    """Logits and the gradient of the mean next-token cross-entropy (a training step's loss),
    in one compiled function; the gradient as a flat {path: array} of per-layer paths."""
    ids, mask = padded_batch(left=True, seed=seed)

    def loss(params):
        logits = module.apply({"params": params}, ids, mask)
        return mean_next_token_loss(logits, ids, mask), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return np.asarray(logits), convert.unstack_layers(_flatten(grads), "layers")


@pytest.fixture(scope="module")
def unrolled_reference(llama_dir):
    return logits_and_gradients(*load(llama_dir[1]))


# jax.checkpoint's primitive ("remat2"; "checkpoint" in some jax versions).
REMAT_PRIMITIVES = {"remat2", "checkpoint", "remat"}


def remat_equations(module, params) -> list:
    """(equation, whether it is inside a scan) for every checkpoint primitive in the jaxpr of
    the training loss's gradient, sub-jaxprs (jit, scan, ...) included."""
    ids, mask = padded_batch(left=True)

    def loss(params):
        return mean_next_token_loss(module.apply({"params": params}, ids, mask), ids, mask)

    found = []

    def walk(jaxpr, inside_scan):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in REMAT_PRIMITIVES:
                found.append((eqn, inside_scan))
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        walk(sub, inside_scan or eqn.primitive.name == "scan")

    walk(jax.make_jaxpr(jax.grad(loss))(params).jaxpr, False)
    return found


def assert_same_tree(got: dict, want: dict):
    assert set(got) == set(want)
    for path in want:
        np.testing.assert_allclose(got[path], want[path], atol=TOL, err_msg=path)


def test_scanned_llama_equals_unrolled_logits_and_gradients(
    llama_dir, scanned_llama, unrolled_reference
):
    scanned, params = scanned_llama
    kernel = params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert kernel.shape == (LAYERS, 32, 32) and "layers_0" not in params["model"]
    _, unrolled_params = load(llama_dir[1])
    np.testing.assert_array_equal(
        kernel[2], unrolled_params["model"]["layers_2"]["self_attn"]["q_proj"]["kernel"]
    )
    logits, grads = logits_and_gradients(scanned, params)
    np.testing.assert_allclose(logits, unrolled_reference[0], atol=TOL)
    assert_same_tree(grads, unrolled_reference[1])


@pytest.mark.parametrize(
    "scan, policy",
    [
        (True, "dots"),
        (False, "full"),
        pytest.param(True, "full", marks=pytest.mark.slow),
        pytest.param(False, "dots_no_batch", marks=pytest.mark.slow),
    ],
)
def test_remat_gives_the_same_gradients(llama_dir, unrolled_reference, scan, policy):
    module, params = load(llama_dir[1], scan_layers=scan, remat_policy=policy)
    assert module.remat_policy == policy
    # The gradient really rematerialises: one checkpoint per layer (unrolled) or one in the scan
    # body, each with the policy asked for, and none without remat.
    remats = remat_equations(module, params)
    assert len(remats) == (1 if scan else LAYERS), remats
    assert all(inside_scan == scan for _, inside_scan in remats)
    assert all(eqn.params["policy"] is REMAT_POLICIES[policy] for eqn, _ in remats)
    assert remat_equations(*load(llama_dir[1], scan_layers=scan)) == []
    logits, grads = logits_and_gradients(module, params)
    np.testing.assert_allclose(logits, unrolled_reference[0], atol=TOL)
    assert_same_tree(grads, unrolled_reference[1])


def test_scanned_stack_with_sliding_and_global_layers(tmp_path):
    """Qwen2 with layer 0 global and layer 1 sliding: the scanned layer looks its window up."""
    model = tiny_decoder("qwen2")
    model.save_pretrained(tmp_path)
    scanned, params = load(tmp_path, scan_layers=True)
    ids, mask = padded_batch(length=12)  # longer than the window (3)
    np.testing.assert_allclose(
        scanned.apply({"params": params}, ids, mask), torch_forward(model, ids, mask), atol=TOL
    )


def test_scanned_model_saves_per_layer_tensors_that_transformers_loads(
    llama_dir, scanned_llama, tmp_path
):
    model, _ = llama_dir
    module, params = scanned_llama
    pifi_jax.save_pretrained(module, params, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    ids, mask = padded_batch(seed=1)
    np.testing.assert_allclose(
        torch_forward(reloaded, ids, mask), torch_forward(model, ids, mask), atol=TOL
    )


def test_scanned_leaves_get_a_leading_layers_axis_in_their_shardings(scanned_llama):
    module, params = scanned_llama
    flat = _flatten(params)
    mesh = jax.sharding.AbstractMesh((1, 2, 2), parallel.MESH_AXES)
    specs = {
        path: tuple(s.spec)
        for path, s in parallel.param_shardings(
            flat, module_family(module).PARAM_AXES, mesh
        ).items()
    }
    assert specs["model/layers/self_attn/q_proj/kernel"] == (None, "fsdp", "tensor")
    assert specs["model/layers/mlp/down_proj/kernel"] == (None, None, "fsdp")  # mlp 37: odd
    assert specs["model/layers/input_layernorm/scale"] == (None, None)
    assert specs["model/embed_tokens/embedding"] == (None, "fsdp")


def module_family(module):
    from pifi_jax.models import registry

    return registry.family_for(module.config.model_type)


def test_scan_and_remat_options_are_checked(llama_dir, tiny_bert_dir):
    _, directory = llama_dir
    with pytest.raises(ValueError, match="remat_policy 'some'"):
        load(directory, remat_policy="some")
    with pytest.raises(ValueError, match="not a decoder"):
        pifi_jax.from_pretrained(tiny_bert_dir, scan_layers=True, log=lambda *_: None)


def test_generation_with_a_scanned_stack_matches_transformers(llama_dir, scanned_llama):
    """The cache travels through the scan carry: greedy tokens equal transformers' own."""
    from tests.test_generate import NEW, hf_generate, left_padded_prompts

    model, _ = llama_dir
    module, params = scanned_llama
    ids, mask = left_padded_prompts()
    theirs = hf_generate(model, ids, mask, eos_token_id=None)
    ours = pifi_jax.generate(module, params, ids, mask, max_new_tokens=NEW, eos_token_id=())
    np.testing.assert_array_equal(np.asarray(ours), theirs)
