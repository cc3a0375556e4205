"""The PEFT method x architecture matrix beyond BERT/RoBERTa/ELECTRA (those are in test_peft.py):
ALBERT, DeBERTa, DeBERTa-v3 (classification) and the decoders (causal LM).

Every architecture is one entry in ARCHS. Each case builds the model with the method, checks that
it starts as the base model (methods that add tokens: that it does not), counts the trainable
parameters against a reference that is not the code under test, trains two steps and checks that
exactly the trainable leaves move. The references: Hugging Face PEFT itself (LoRA, DoRA, IA3,
prefix and prompt tuning: `get_peft_model(...).get_nb_trainable_parameters()` on the same tiny
PyTorch model), the PyTorch model's own parameter names (BitFit, top-k, the norms Houlsby trains),
or the method's formula (bottleneck adapters; prefix tuning on ALBERT / DeBERTa, which PEFT
cannot do). Decoders use Hugging Face PEFT's per-architecture default targets on both sides.

The default run keeps llama for every method and gpt2 for the methods whose Hugging Face interop
test (test_peft_decoders.py, default run too) does not already cover it; the rest is `slow`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pifi_jax
from pifi_jax import peft
from pifi_jax.train import partition
from pifi_jax.train.metrics import mean_next_token_loss
from pifi_jax.train.objectives import Classification
from pifi_jax.train.step import TrainState, make_train_step

torch = pytest.importorskip("torch")
hf_peft = pytest.importorskip("peft")

from tests import hf_reference as ref  # noqa: E402
from tests.test_models_albert import batch_of as albert_batch  # noqa: E402
from tests.test_models_albert import tiny_albert  # noqa: E402
from tests.test_models_deberta import batch_of as deberta_batch  # noqa: E402
from tests.test_models_deberta import tiny_deberta  # noqa: E402
from tests.test_models_decoders import padded_batch, tiny_decoder  # noqa: E402

LABELS, P, M = 3, 3, 4
# The cases compile one train step each; XLA's CPU backend at optimisation level 0 compiles them
# about three times faster, and these tests are about which leaves train, not speed.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@dataclasses.dataclass(frozen=True)
class Arch:
    make_model: Callable  # () -> a tiny random transformers model (eval mode)
    make_batch: Callable  # () -> model inputs (numpy)
    causal_lm: bool = False
    # IA3 and LoRA targets for both sides where Hugging Face PEFT has no default (None: defaults).
    ia3: tuple | None = None
    lora: tuple | None = None


def _decoder(case):
    def batch():
        ids, mask = padded_batch()
        return {"input_ids": ids, "attention_mask": mask}

    return Arch(lambda: tiny_decoder(case), batch, causal_lm=True)


ARCHS = {
    "albert": Arch(
        lambda: tiny_albert("shared"),
        lambda: albert_batch(pair=True),
        ia3=(("key", "value", "ffn_output"), ("ffn_output",)),
        lora=("query", "value"),
    ),
    "deberta": Arch(
        lambda: tiny_deberta("v1-c2p-p2c"),
        lambda: deberta_batch(pair=True),
        ia3=(("in_proj", "output.dense"), ("output.dense",)),
    ),
    "deberta-v3": Arch(
        lambda: tiny_deberta("v3"),
        lambda: deberta_batch(pair=True),
        ia3=(("key_proj", "value_proj", "output.dense"), ("output.dense",)),
    ),
    "llama": _decoder("llama"),
    "mistral": _decoder("mistral"),
    "qwen2": _decoder("qwen2"),
    "gemma2": _decoder("gemma2"),
    "falcon": _decoder("falcon"),
    "gpt2": _decoder("gpt2"),
}
# The leaves each method trains besides the head (a regex on our paths).
METHODS = {
    "lora": r"/lora_(a|b)$",
    "dora": r"/lora_(a|b|magnitude)$",
    "ia3": r"/ia3_l$",
    "bitfit": r"/([a-z]+_)?bias$",
    "topk": r"(layers|layer|h|albert_layer_groups)_\d+/",
    "adapter_houlsby": r"/(adapter_(down|up)/(kernel|bias)|[A-Za-z_0-9]*(norm|Norm|ln_\d|ln_f)/\w+)$",
    "adapter_pfeiffer": r"/adapter_(down|up)/(kernel|bias)$",
    "prefix": r"^prefix_encoder/",
    "prompt": r"^prompt_encoder/",
}
# Methods whose model is not the base model at initialisation (they add tokens).
ADDS_TOKENS = {"prefix", "prompt"}
# Default run: llama everywhere; gpt2 where test_peft_decoders.py has no interop case; the
# encoder families' LoRA-family, BitFit and top-k cases and their (pifi_jax-defined) prefix.
DEFAULT = {
    "llama": set(METHODS),
    "gpt2": {"bitfit", "topk", "adapter_houlsby", "adapter_pfeiffer"},
    "albert": {"lora", "dora", "ia3", "bitfit", "topk", "prefix"},
    "deberta": {"lora", "dora", "ia3", "bitfit", "topk", "prefix"},
    "deberta-v3": {"lora", "dora", "ia3", "bitfit", "topk", "prefix"},
}


def _cases():
    for arch in ARCHS:
        for method in METHODS:
            marks = [] if method in DEFAULT.get(arch, ()) else [pytest.mark.slow]
            yield pytest.param(arch, method, marks=marks, id=f"{method}-{arch}")


def _configs(arch: Arch, method: str, torch_config):
    """(ours, Hugging Face PEFT's or None) for a method on an architecture."""
    task_type = "CAUSAL_LM" if arch.causal_lm else "SEQ_CLS"
    lora = dict(task_type=task_type, r=4, lora_alpha=8)
    if arch.lora:
        lora["target_modules"] = list(arch.lora)
    ia3_ours, ia3_theirs = {}, {}
    if arch.ia3:
        targets, feedforward = arch.ia3
        ia3_ours = dict(target_modules=targets, feedforward_modules=feedforward)
        ia3_theirs = dict(target_modules=list(targets), feedforward_modules=list(feedforward))
    # Our side uses its defaults: equal counts show they select what the reference selects.
    return {
        "lora": (peft.LoraConfig(r=4, lora_alpha=8), hf_peft.LoraConfig(**lora)),
        "dora": (peft.DoraConfig(r=4, lora_alpha=8), hf_peft.LoraConfig(**lora, use_dora=True)),
        "ia3": (peft.IA3Config(**ia3_ours), hf_peft.IA3Config(task_type=task_type, **ia3_theirs)),
        "bitfit": (peft.BitFitConfig(), None),
        "topk": (peft.TopKConfig(k=1), None),
        "adapter_houlsby": (peft.AdapterConfig(kind="houlsby", bottleneck_size=M), None),
        "adapter_pfeiffer": (
            peft.AdapterConfig(kind="pfeiffer", bottleneck_size=M, non_linearity="gelu"),
            None,
        ),
        "prefix": (
            peft.PrefixTuningConfig(num_virtual_tokens=P),
            hf_peft.PrefixTuningConfig(
                task_type=task_type, num_virtual_tokens=P, **_multi_query_prefix(torch_config)
            ),
        ),
        "prompt": (
            peft.PromptTuningConfig(num_virtual_tokens=P),
            # ALBERT embeds 16 wide before projecting: that is the prompt's width.
            hf_peft.PromptTuningConfig(
                task_type=task_type,
                num_virtual_tokens=P,
                token_dim=getattr(torch_config, "embedding_size", None),
            ),
        ),
    }[method]


def _multi_query_prefix(torch_config) -> dict:
    """Falcon-7B's multi-query attention has one key/value head; PEFT's defaults give the prefix
    all the query heads, which transformers' Falcon cache cannot take: name the one head."""
    if getattr(torch_config, "multi_query", False):
        head_dim = torch_config.hidden_size // torch_config.num_attention_heads
        return dict(num_attention_heads=1, token_dim=head_dim)
    return {}


def _expected_trainable(torch_model, method: str, hf_config) -> int:
    named = {n: p.numel() for n, p in torch_model.named_parameters()}
    config = torch_model.config
    head = sum(v for n, v in named.items() if n.startswith("classifier."))
    if method == "prefix" and config.model_type in ("albert", "deberta", "deberta-v2"):
        # pifi_jax's own prefix (PEFT has none here): one block per layer application.
        applications = config.num_hidden_layers * getattr(config, "inner_group_num", 1)
        return head + P * applications * 2 * config.hidden_size
    if hf_config is not None:
        trainable, _ = hf_peft.get_peft_model(torch_model, hf_config).get_nb_trainable_parameters()
        return trainable
    if method == "bitfit":
        return head + sum(
            v for n, v in named.items() if n.endswith("bias") and not n.startswith("classifier.")
        )
    if method == "topk":  # k=1: the last layer of the stack (ALBERT: its one shared group)
        layers = {}
        for n in named:
            match = re.search(r"\.(layer|layers|h|albert_layer_groups)\.(\d+)\.", n)
            if match:
                layers.setdefault(int(match.group(2)), []).append(n)
        return head + sum(named[n] for n in layers[max(layers)])
    # Bottleneck adapters: per site down [d, m] + m, up [m, d] + d; Houlsby: 2 sites a layer and
    # every norm, Pfeiffer: 1 site a layer.
    d, layers = config.hidden_size, config.num_hidden_layers
    if config.model_type == "albert":
        layers = 1  # one shared layer, one shared adapter per site
    sites = layers * (2 if method == "adapter_houlsby" else 1)
    norms = sum(v for n, v in named.items() if re.search(r"(norm|Norm|\.ln_\d|\.ln_f)\.", n))
    return head + sites * (2 * d * M + M + d) + (norms if method == "adapter_houlsby" else 0)


def _next_token_step(module, optimizer):
    """A train step on the mean next-token cross-entropy of real tokens (prompt slots skipped)."""

    def loss_fn(trainable, frozen, batch):
        params = partition.merge_params(trainable, frozen)
        logits = module.apply(
            {"params": params}, batch["input_ids"], batch["attention_mask"], deterministic=True
        )
        logits = logits[:, -batch["input_ids"].shape[1] :]  # the prompt's own slots dropped
        return mean_next_token_loss(logits, batch["input_ids"], batch["attention_mask"])

    def step(state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, state.frozen, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state.replace(params=params, opt_state=opt_state), loss

    return step


def _logits(module, params, batch):
    return np.asarray(module.apply({"params": params}, **batch))


@pytest.mark.parametrize("arch_name, method", list(_cases()))
def test_method_matrix(tmp_path, arch_name, method):
    arch = ARCHS[arch_name]
    torch_model = arch.make_model()
    config, hf_config = _configs(arch, method, torch_model.config)
    torch_model.save_pretrained(tmp_path / "base")
    batch = arch.make_batch()
    expected_logits = ref.torch_logits(torch_model, batch)
    load = dict(task="causal_lm") if arch.causal_lm else dict(num_labels=LABELS)
    if method == "bitfit" and not any(
        n.endswith("bias") for n, _ in torch_model.named_parameters()
    ):
        with pytest.raises(ValueError, match="BitFit: this .* model has no bias parameters"):
            pifi_jax.from_pretrained(tmp_path / "base", peft=config, log=lambda *_: None, **load)
        return
    module, params = pifi_jax.from_pretrained(
        tmp_path / "base", peft=config, log=lambda *_: None, **load
    )
    logits = _logits(module, params, batch)
    if method in ADDS_TOKENS:
        if arch.causal_lm and method == "prompt":
            logits = logits[:, P:]  # the prompt's slots have logits too, as in HF PEFT
        assert np.abs(logits - expected_logits).max() > 1e-4, "the virtual tokens change nothing"
    else:  # identity at initialisation
        np.testing.assert_allclose(logits, expected_logits, atol=1e-5)

    rules = peft.trainable_rules(module, params)
    trainable, frozen = partition.split_params(params, rules)
    n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
    assert n_trainable == _expected_trainable(arch.make_model(), method, hf_config)

    optimizer = optax.adam(1e-2)
    state = TrainState.create(trainable, frozen, optimizer)
    if arch.causal_lm:
        step = jax.jit(_next_token_step(module, optimizer), compiler_options=FAST_COMPILE)
        for _ in range(2):
            state, loss = step(state, batch)
    else:
        step = jax.jit(
            make_train_step(Classification(module, LABELS), optimizer),
            compiler_options=FAST_COMPILE,
        )
        train_batch = dict(batch, labels=jnp.array([0, 1, 2]), weights=jnp.ones(3))
        for _ in range(2):
            state, metrics = step(state, train_batch, jax.random.PRNGKey(0))
        loss = metrics["loss"]
    assert np.isfinite(float(loss))
    before, after = partition.flatten(trainable), partition.flatten(state.params)
    moved = {p for p in before if not np.array_equal(np.asarray(before[p]), np.asarray(after[p]))}
    owned = {p for p in before if re.search(METHODS[method], p)}
    assert owned, f"no {method} leaves"
    # Every leaf of the method moves (DoRA's magnitude too); nothing else but the head is trainable.
    assert owned <= moved, sorted(owned - moved)[:5]
    assert set(before) - owned <= {p for p in before if p.startswith("classifier/")}
    assert set(partition.flatten(state.frozen)) == set(partition.flatten(frozen))
