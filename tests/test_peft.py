"""PEFT methods: the method x architecture matrix, identity at init, merge, and interoperability
with Hugging Face PEFT (PyTorch) in both directions."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pifi_jax
from pifi_jax import peft
from pifi_jax.train import partition
from pifi_jax.train.objectives import Classification
from pifi_jax.train.step import TrainState, make_train_step
from tests import hf_reference as ref

torch = pytest.importorskip("torch")
hf_peft = pytest.importorskip("peft")

ARCHS = ["bert", "roberta", "electra"]
# The matrix compiles one train step per case; XLA's CPU backend at optimisation level 0 compiles
# them about three times faster, and these tests are about which leaves train, not speed.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
H, FFN, LAYERS, LABELS = ref.TINY["hidden_size"], ref.TINY["intermediate_size"], 2, 3
HEAD = {  # parameters of the task head each family trains with every method
    "bert": H * LABELS + LABELS,
    "roberta": H * H + H + H * LABELS + LABELS,
    "electra": H * H + H + H * LABELS + LABELS,
}


def _layernorms(model_type):
    # two per layer, plus the embeddings' (ELECTRA: over its 16-wide embeddings)
    return LAYERS * 2 * 2 * H + 2 * (16 if model_type == "electra" else H)


def _bottleneck(m):
    return H * m + m + m * H + H  # down kernel + bias, up kernel + bias


def _biases(model_type):
    per_layer = 3 * H + H + H + FFN + H + H  # q,k,v, attn out, attn LN, intermediate, out, out LN
    # embeddings LayerNorm (ELECTRA: over its 16-wide embeddings, then the projection to H)
    emb = 16 + H if model_type == "electra" else H
    pooler = H if model_type == "bert" else 0
    return LAYERS * per_layer + emb + pooler


METHODS = {
    # name: (config, trainable parameter count excluding the head, leaves that must change)
    "lora": (
        peft.LoraConfig(r=4, lora_alpha=8),
        lambda t: LAYERS * 2 * (H * 4 + 4 * H),
        r"/lora_(a|b)$",
    ),
    "dora": (
        peft.DoraConfig(r=4, lora_alpha=8),
        lambda t: LAYERS * 2 * (H * 4 + 4 * H + H),
        r"/lora_(a|b|magnitude)$",
    ),
    "rslora_bias": (
        peft.LoraConfig(r=4, use_rslora=True, bias="all", lora_dropout=0.1),
        lambda t: LAYERS * 2 * (H * 4 + 4 * H) + _biases(t),
        r"/(lora_(a|b)|bias)$",
    ),
    "ia3": (peft.IA3Config(), lambda t: LAYERS * (H + H + H + FFN), r"/ia3_l$"),
    "bitfit": (peft.BitFitConfig(), lambda t: _biases(t), r"/bias$"),
    "topk": (
        peft.TopKConfig(k=1),
        lambda t: (4 * H * H + 2 * H * FFN) + (4 * H + FFN + H + 4 * H),
        r"layer_1/",
    ),
    "adapter_houlsby": (
        peft.AdapterConfig(kind="houlsby", bottleneck_size=4),
        lambda t: LAYERS * 2 * _bottleneck(4) + _layernorms(t),
        r"/(adapter_(down|up)/(kernel|bias)|LayerNorm/(scale|bias))$",
    ),
    "adapter_pfeiffer": (
        peft.AdapterConfig(kind="pfeiffer", bottleneck_size=4, non_linearity="gelu"),
        lambda t: LAYERS * _bottleneck(4),
        r"/adapter_(down|up)/(kernel|bias)$",
    ),
    "prefix_mlp": (
        peft.PrefixTuningConfig(
            num_virtual_tokens=5, prefix_projection=True, encoder_hidden_size=8
        ),
        lambda t: 5 * H + (H * 8 + 8) + (8 * LAYERS * 2 * H + LAYERS * 2 * H),
        r"^prefix_encoder/",
    ),
    "prompt": (
        peft.PromptTuningConfig(num_virtual_tokens=5),
        lambda t: 5 * (16 if t == "electra" else H),
        r"^prompt_encoder/",
    ),
}
# Methods whose model is not the base model at initialisation (they add tokens); their outputs
# are compared with Hugging Face PEFT in tests/test_peft_prefix_prompt.py instead.
NOT_IDENTITY_AT_INIT = {"prefix_mlp", "prompt"}


def _load(tmp_path, model_type, config, seed=0):
    model = ref.tiny_encoder(model_type, num_labels=LABELS)
    model.save_pretrained(tmp_path / "base")
    module, params = pifi_jax.from_pretrained(
        tmp_path / "base", num_labels=LABELS, peft=config, seed=seed, log=lambda *_: None
    )
    return model, module, params


def _logits(module, params, batch):
    return np.asarray(module.apply({"params": params}, **batch))


# Every method runs on BERT by default, and on RoBERTa / ELECTRA LoRA only (every method with
# -m slow): the three families differ only in embeddings and head, which the PEFT methods do
# not touch and which prefix / prompt tuning meet in tests/test_peft_prefix_prompt.py (against
# HF PEFT).
ON_EVERY_FAMILY_BY_DEFAULT = {"lora"}


def _matrix_cases():
    for method in sorted(METHODS):
        for model_type in ARCHS:
            slow = method not in ON_EVERY_FAMILY_BY_DEFAULT and model_type != "bert"
            marks = [pytest.mark.slow] if slow else []
            yield pytest.param(model_type, method, marks=marks, id=f"{method}-{model_type}")


@pytest.mark.parametrize("model_type, method", list(_matrix_cases()))
def test_method_matrix(tmp_path, model_type, method):
    config, count, changing = METHODS[method]
    model, module, params = _load(tmp_path, model_type, config)
    batch = ref.random_batch(model_type, pair=True)
    if method in NOT_IDENTITY_AT_INIT:
        gap = np.abs(_logits(module, params, batch) - ref.torch_logits(model, batch)).max()
        assert gap > 1e-4, "the virtual tokens change nothing"
    else:
        # Identity at initialisation: the PEFT model computes exactly the base model.
        np.testing.assert_allclose(
            _logits(module, params, batch), ref.torch_logits(model, batch), atol=1e-5
        )

    rules = peft.trainable_rules(module, params)
    trainable, frozen = partition.split_params(params, rules)
    n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
    assert n_trainable == count(model_type) + HEAD[model_type]

    optimizer = optax.adam(1e-2)
    state = TrainState.create(trainable, frozen, optimizer)
    step = jax.jit(
        make_train_step(Classification(module, LABELS), optimizer), compiler_options=FAST_COMPILE
    )
    train_batch = dict(batch, labels=jnp.array([0, 1, 2]), weights=jnp.ones(3))
    for _ in range(3):
        state, metrics = step(state, train_batch, jax.random.PRNGKey(0))
    assert np.isfinite(float(metrics["loss"]))
    before, after = partition.flatten(trainable), partition.flatten(state.params)
    for path in before:
        moved = not np.array_equal(np.asarray(before[path]), np.asarray(after[path]))
        if re.search(changing, path) or path.startswith("classifier/"):
            assert moved, f"{path} should train under {method}"
    # Frozen leaves are not in the optimizer's hands at all.
    assert set(partition.flatten(state.frozen)) == set(partition.flatten(frozen))
    opt_leaves = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
    assert opt_leaves == 2 * n_trainable  # adam: mu and nu for trainable leaves only


def _randomize_adapters(module, params, seed=1):
    """Non-trivial adapter values (B != 0, IA3 != 1, DoRA m != |W|) so tests cannot pass by identity."""
    flat = partition.flatten(params)
    rng = np.random.default_rng(seed)
    for path, value in flat.items():
        if path.rsplit("/", 1)[-1] in peft.core.ADAPTER_LEAVES:
            flat[path] = jnp.asarray(
                np.asarray(value) + 0.3 * rng.standard_normal(value.shape), value.dtype
            )
    return partition.unflatten(flat)


INTEROP = {
    "lora": peft.LoraConfig(r=4, lora_alpha=8),
    "rslora": peft.LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=("query", "key", "attention.output.dense"),
    ),
    "dora": peft.DoraConfig(r=4, lora_alpha=8),
    "ia3": peft.IA3Config(),
}


@pytest.mark.parametrize("model_type", ARCHS)
@pytest.mark.parametrize("name", sorted(INTEROP))
def test_export_loads_in_hf_peft_with_same_logits(tmp_path, model_type, name):
    model, module, params = _load(tmp_path, model_type, INTEROP[name])
    params = _randomize_adapters(module, params)
    peft.save_adapter(module, params, tmp_path / "adapter", format="peft")
    torch_model = hf_peft.PeftModel.from_pretrained(
        ref.tiny_encoder(model_type, num_labels=LABELS), tmp_path / "adapter"
    )
    torch_model.eval()
    batch = ref.random_batch(model_type, pair=True)
    ours = _logits(module, params, batch)
    assert np.abs(ours - ref.torch_logits(model, batch)).max() > 1e-4  # the adapter matters
    np.testing.assert_allclose(ours, ref.torch_logits(torch_model, batch), atol=1e-5)


@pytest.mark.parametrize("model_type", ARCHS)
@pytest.mark.parametrize("name", ["lora", "dora", "ia3"])
def test_hf_peft_adapter_imports_with_same_logits(tmp_path, model_type, name):
    base = ref.tiny_encoder(model_type, num_labels=LABELS)
    base.save_pretrained(tmp_path / "base")
    if name == "ia3":
        # (HF PEFT has no IA3 default targets for ELECTRA: name the usual ones.)
        hf_config = hf_peft.IA3Config(
            task_type="SEQ_CLS",
            init_ia3_weights=False,
            target_modules=["key", "value", "output.dense"],
            feedforward_modules=["output.dense"],
        )
    else:
        hf_config = hf_peft.LoraConfig(
            task_type="SEQ_CLS", r=4, lora_alpha=8, init_lora_weights=False, use_dora=name == "dora"
        )
    torch_model = hf_peft.get_peft_model(ref.tiny_encoder(model_type, num_labels=LABELS), hf_config)
    with torch.no_grad():  # a trained-looking head too
        for n, p in torch_model.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.1 * torch.randn_like(p))
    torch_model.eval()
    torch_model.save_pretrained(tmp_path / "adapter")
    config = peft.read_adapter_config(tmp_path / "adapter")
    module, params = pifi_jax.from_pretrained(
        tmp_path / "base", num_labels=LABELS, peft=config, log=lambda *_: None
    )
    params = peft.load_adapter(module, params, tmp_path / "adapter")
    batch = ref.random_batch(model_type, pair=True)
    np.testing.assert_allclose(
        _logits(module, params, batch), ref.torch_logits(torch_model, batch), atol=1e-4
    )


@pytest.mark.parametrize("name", ["lora", "dora", "ia3"])
def test_merge_equals_unmerged_and_unmerge_restores_bitwise(tmp_path, name):
    _, module, params = _load(tmp_path, "bert", INTEROP[name])
    params = _randomize_adapters(module, params)
    base_module, merged, undo = peft.merge(module, params)
    assert not any(
        k.rsplit("/", 1)[-1] in peft.core.ADAPTER_LEAVES for k in partition.flatten(merged)
    )
    batch = ref.random_batch("bert", pair=True)
    np.testing.assert_allclose(
        _logits(base_module, merged, batch), _logits(module, params, batch), atol=1e-5
    )
    restored = peft.unmerge(module, merged, undo)
    flat_a, flat_b = partition.flatten(params), partition.flatten(restored)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        assert np.array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key])), key
    # The merged model exports as a plain transformers checkpoint with the same logits.
    pifi_jax.save_pretrained(base_module, merged, tmp_path / "merged")
    import transformers

    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "merged"
    ).eval()
    np.testing.assert_allclose(
        ref.torch_logits(reloaded, batch), _logits(module, params, batch), atol=1e-5
    )


def _perturb_trainable(module, params, seed=1):
    """Every trainable leaf (adapters, biases, layers, virtual tokens and the head) moved off its
    initial value, so a round trip that drops or re-initialises any of them is caught."""
    flat = partition.flatten(params)
    rng = np.random.default_rng(seed)
    for path in partition.flatten(peft.core.adapter_params(module, params)):
        value = flat[path]
        noise = 0.3 * rng.standard_normal(value.shape)
        flat[path] = jnp.asarray(np.asarray(value) + noise, value.dtype)
    return partition.unflatten(flat)


def test_native_adapter_round_trip_for_every_method(tmp_path):
    for name, (config, _, _) in METHODS.items():
        _, module, params = _load(tmp_path / name, "bert", config)
        params = _perturb_trainable(module, params)
        peft.save_adapter(module, params, tmp_path / name / "adapter", format="native")
        assert peft.read_adapter_config(tmp_path / name / "adapter") == config
        # A fresh model whose PEFT leaves (and any head it initialises) come from another seed.
        _, fresh_module, fresh = _load(tmp_path / name, "bert", config, seed=7)
        loaded = peft.load_adapter(fresh_module, fresh, tmp_path / name / "adapter")
        saved = partition.flatten(peft.core.adapter_params(module, params))
        trainable = partition.flatten(peft.core.adapter_params(fresh_module, loaded))
        assert trainable.keys() == saved.keys(), name
        assert any(p.startswith("classifier/") for p in saved), name
        before, after = partition.flatten(fresh), partition.flatten(loaded)
        for path, value in saved.items():
            # not vacuous: the fresh model does not already hold the saved value
            assert not np.array_equal(np.asarray(before[path]), np.asarray(value)), (name, path)
            np.testing.assert_array_equal(np.asarray(after[path]), np.asarray(value), err_msg=path)
        for path in before.keys() - saved.keys():  # the frozen leaves are left alone
            np.testing.assert_array_equal(np.asarray(after[path]), np.asarray(before[path]))
        batch = ref.random_batch("bert")
        np.testing.assert_array_equal(
            _logits(fresh_module, loaded, batch), _logits(module, params, batch)
        )


def test_targeting_rules_follow_hf_peft():
    from pifi_jax.peft.targets import hf_module_name, name_matches

    assert (
        hf_module_name("bert/encoder/layer_10/attention/self/query")
        == "bert.encoder.layer.10.attention.self.query"
    )
    assert name_matches("bert.encoder.layer.0.attention.output.dense", ("output.dense",))
    assert not name_matches("bert.encoder.layer.0.attention.self.query", ("uery",))
    assert name_matches("bert.encoder.layer.0.attention.self.query", r".*layer\.0.*query")
    assert not name_matches("bert.encoder.layer.1.attention.self.query", r"layer\.0.*query")


def test_layers_to_transform_exclude_and_errors(tmp_path):
    config = peft.LoraConfig(
        r=2,
        target_modules=("query", "value", "key"),
        exclude_modules=("key",),
        layers_to_transform=(1,),
    )
    _, module, params = _load(tmp_path, "bert", config)
    targeted = [p for p, _ in module.plan.adapters]
    assert targeted == [
        "bert/encoder/layer_1/attention/self/query",
        "bert/encoder/layer_1/attention/self/value",
    ]
    with pytest.raises(ValueError, match="matched no module"):
        _load(tmp_path / "x", "bert", peft.LoraConfig(target_modules=("nonexistent",)))
    with pytest.raises(ValueError, match="bias"):
        peft.LoraConfig(bias="some")
    with pytest.raises(ValueError, match="use_qalora"):
        peft.config.from_hf_dict({"peft_type": "LORA", "r": 2, "use_qalora": True})


def test_lora_run_through_the_trainer(tiny_bert_dir, tiny_task_files, tmp_path):
    """configs/classify.py with peft.method=lora: adapter-only checkpoints, an exported adapter
    that reproduces the run's results, and evaluate_run agreeing with the run."""
    import json

    from pifi_jax.train import evaluate_run, train_and_evaluate
    from pifi_jax.train.checkpoint import Checkpointer
    from tests.conftest import load_config, tiny_overrides

    overrides = tiny_overrides(tiny_bert_dir, tiny_task_files) + [
        "--config.peft.method=lora",
        "--config.peft.r=4",
        "--config.peft.target_modules=query,key,value",
    ]
    config = load_config("configs/classify.py:runlocal", overrides)
    results = train_and_evaluate(config, tmp_path / "run")
    assert results == json.loads((tmp_path / "run" / "results.json").read_text())

    # The resumable checkpoint holds the trainable leaves only: LoRA factors and the head.
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints")
    state, _ = ckpt.restore(None)
    stored = set(partition.flatten(state["params"]))
    assert stored and all(
        re.search(r"/lora_(a|b)$", p) or p.startswith("classifier/") for p in stored
    )
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 4
    assert len(saved["target_modules"]) == 2 * 3  # 2 layers x (query, key, value)
    ckpt.close()

    again = evaluate_run(config, tmp_path / "run")
    for key, value in again.items():
        assert value == pytest.approx(results[key], abs=1e-9), key

    # The exported adapter loads onto a fresh model, on exactly the modules trained.
    module, params = pifi_jax.from_pretrained(
        tiny_bert_dir,
        num_labels=2,
        peft=peft.read_adapter_config(tmp_path / "run" / "adapter"),
        log=lambda *_: None,
    )
    loaded = partition.flatten(peft.load_adapter(module, params, tmp_path / "run" / "adapter"))
    best_ckpt = Checkpointer(tmp_path / "run" / "checkpoints", best_metric="validation/accuracy")
    best = partition.flatten(best_ckpt.restore_best(None)[0]["params"])
    best_ckpt.close()
    for path, value in best.items():
        np.testing.assert_array_equal(np.asarray(loaded[path]), np.asarray(value))
    assert sorted(p for p, _ in module.plan.adapters) == sorted(
        f"bert/encoder/layer_{i}/attention/self/{m}"
        for i in range(2)
        for m in ("query", "key", "value")
    )


# One trainer step per new method on the tiny setting: configs/classify.py's `peft` fields, what
# they make, and the trained leaves each method must own (besides the head).
TRAINER_METHODS = {
    "adapter_houlsby": (
        ["--config.peft.bottleneck_size=4", "--config.peft.non_linearity=gelu"],
        peft.AdapterConfig(kind="houlsby", bottleneck_size=4, non_linearity="gelu"),
        r"/(adapter_(down|up)/(kernel|bias)|LayerNorm/(scale|bias))$",
    ),
    "adapter_pfeiffer": (
        ["--config.peft.bottleneck_size=4", "--config.peft.train_layernorms=true"],
        peft.AdapterConfig(kind="pfeiffer", bottleneck_size=4, train_layernorms=True),
        r"/(adapter_(down|up)/(kernel|bias)|LayerNorm/(scale|bias))$",
    ),
    "prefix": (
        ["--config.peft.num_virtual_tokens=3", "--config.peft.prefix_projection=True"],
        peft.PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True),
        r"^prefix_encoder/",
    ),
    "prompt": (
        [
            "--config.peft.num_virtual_tokens=3",
            "--config.peft.prompt_tuning_init=TEXT",
            "--config.peft.prompt_tuning_init_text=a good film",
            "--config.peft.tokenizer_name_or_path={model}",
        ],
        lambda model: peft.PromptTuningConfig(
            num_virtual_tokens=3,
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text="a good film",
            tokenizer_name_or_path=str(model),
        ),
        r"^prompt_encoder/",
    ),
}
_TRAIN_SCRIPT = """
import json, sys
from pathlib import Path
from pifi_jax.train import train_and_evaluate
from tests.conftest import load_config

root, runs = Path(sys.argv[1]), json.loads(sys.argv[2])
for method, overrides in runs.items():
    train_and_evaluate(load_config("configs/classify.py:runlocal", overrides), root / method)
"""


def _trainer_overrides(model_dir, files, method) -> list[str]:
    from tests.conftest import tiny_overrides

    flags = [f.format(model=model_dir) for f in TRAINER_METHODS[method][0]]
    return tiny_overrides(model_dir, files) + [
        f"--config.peft.method={method}",
        *flags,
        "--config.train.num_steps=1",
        "--config.train.eval_every_steps=1",
        "--config.data.buckets=(32,)",
    ]


@pytest.fixture(scope="module")
def trainer_runs(tiny_bert_dir, tiny_task_files, tmp_path_factory):
    """Every method of TRAINER_METHODS through train_and_evaluate, in one child python whose XLA
    CPU backend compiles at optimisation level 0 (about three times faster; the runs are checked
    for what trains and what is saved, not for speed)."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO, subprocess_env

    root = tmp_path_factory.mktemp("trainer_runs")
    runs = {m: _trainer_overrides(tiny_bert_dir, tiny_task_files, m) for m in TRAINER_METHODS}
    env = subprocess_env(1, quick_compile=True)
    proc = subprocess.run(
        [sys.executable, "-c", _TRAIN_SCRIPT, str(root), json.dumps(runs)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (root / "stdout.txt").write_text(proc.stdout)
    return root


@pytest.mark.parametrize("method", list(TRAINER_METHODS))
def test_new_methods_train_one_step_through_the_trainer(
    trainer_runs, tiny_bert_dir, tiny_task_files, method
):
    import json

    from pifi_jax.train.checkpoint import Checkpointer
    from tests.conftest import load_config

    _, expected, owned = TRAINER_METHODS[method]
    if callable(expected):
        expected = expected(tiny_bert_dir)
    config = load_config(
        "configs/classify.py:runlocal", _trainer_overrides(tiny_bert_dir, tiny_task_files, method)
    )
    assert peft.config.from_flat_config(config.peft) == expected
    run = trainer_runs / method
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 1 and np.isfinite(results["validation/accuracy"])

    ckpt = Checkpointer(run / "checkpoints")
    state, _ = ckpt.restore(None)
    ckpt.close()
    stored = partition.flatten(state["params"])
    assert stored and all(re.search(owned, p) or p.startswith("classifier/") for p in stored)
    assert any(re.search(owned, p) for p in stored)
    assert results["trainable_params"] == sum(np.asarray(v).size for v in stored.values())
    # The run's adapter: in Hugging Face PEFT's format where PEFT has one (prefix and prompt tuning
    # on BERT), else natively, which the run's log says and why (bottleneck adapters).
    log = (trainer_runs / "stdout.txt").read_text()
    if method in ("prefix", "prompt"):
        saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
        assert saved["peft_type"] == {"prefix": "PREFIX_TUNING", "prompt": "PROMPT_TUNING"}[method]
        assert f"adapter (peft format): {run / 'adapter'}" in log
        # It holds the run's best parameters in PEFT's layout: the prompt, or the table the
        # prefix MLP outputs (PEFT keeps no MLP), and the head.
        from safetensors.numpy import load_file

        stored = load_file(str(run / "adapter" / "adapter_model.safetensors"))
        best_ckpt = Checkpointer(run / "checkpoints", best_metric="validation/accuracy")
        best = best_ckpt.restore_best(None)[0]["params"]
        best_ckpt.close()
        if method == "prompt":
            table = best["prompt_encoder"]["embedding"]
        else:
            encoder = peft.prefix.PrefixEncoder(3, 2, 32, projection=True, encoder_hidden_size=32)
            table = encoder.apply({"params": best["prefix_encoder"]})
        np.testing.assert_allclose(stored["prompt_embeddings"], table, atol=1e-6)
        np.testing.assert_array_equal(
            stored["base_model.classifier.weight"], np.asarray(best["classifier"]["kernel"]).T
        )
    else:
        meta = json.loads((run / "adapter" / "pifi_adapter.json").read_text())
        assert meta["model_type"] == "bert"
        assert peft.read_adapter_config(run / "adapter") == expected
        assert (
            "adapter saved in pifi_jax's native format: Hugging Face PEFT has no format for "
            f"'adapter'\nadapter (native format): {run / 'adapter'}"
        ) in log
