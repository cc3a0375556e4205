"""IST / RST in the trainer (pifi_jax.ist): the probe's per-layer branch factors, refused settings,
whole runs on an encoder and a decoder, inactive layers untouched, one compilation for every mask,
and a crashed run resumed bit for bit. The pieces alone: test_ist_scores.py, test_ist_optim.py."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pifi_jax
from pifi_jax import peft
from pifi_jax.ist import layer_groups, layer_index_of
from pifi_jax.layers.linear import branch_scales
from pifi_jax.train import partition, train_and_evaluate
from tests.conftest import (
    load_config,
    run_crashing_after,
    tiny_overrides,
    write_tiny_decoder,
    write_tiny_encoder,
)

LAYERS = 4


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    return write_tiny_decoder(tmp_path_factory.mktemp("llama4"), "llama", layers=LAYERS)


@pytest.fixture(scope="module")
def bert4(tmp_path_factory):
    return write_tiny_encoder(tmp_path_factory.mktemp("bert4"), "bert", layers=LAYERS)


def _perturbed(params, seed=1):
    flat = partition.flatten(params)
    rng = np.random.default_rng(seed)
    for path, value in flat.items():
        if any(k in path for k in ("lora_", "adapter_")):
            noise = 0.3 * rng.standard_normal(value.shape).astype(np.float32)
            flat[path] = np.asarray(value) + noise
    return partition.unflatten(flat)


METHODS = {
    "lora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj", "down_proj")),
    "dora": peft.DoraConfig(r=4, lora_alpha=8),
    "adapter_houlsby": peft.AdapterConfig(kind="houlsby", bottleneck_size=8),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_branch_factor_scales_one_layers_peft_branch(llama4, method):
    """A factor on layer 2's branch is the model with layer 2's LoRA B (or adapter up-projection)
    multiplied by it: LoRA and DoRA deltas are linear in B, an adapter's output in its up layer."""
    module, params = pifi_jax.from_pretrained(
        llama4, task="causal_lm", peft=METHODS[method], log=_quiet
    )
    params = _perturbed(params)
    ids = jnp.asarray(np.random.default_rng(0).integers(4, 30, size=(2, 7)), jnp.int32)
    factors = jnp.asarray([1.0, 1.0, 0.25, 1.0])

    def group(path):
        return layer_index_of(path)

    with branch_scales(factors, group):
        scaled = module.apply({"params": params}, ids)
    flat = partition.flatten(params)
    changed = 0
    for path in flat:
        if layer_index_of(path) == 2 and ("lora_b" in path or "adapter_up" in path):
            flat[path] = 0.25 * np.asarray(flat[path])
            changed += 1
    assert changed
    manual = module.apply({"params": partition.unflatten(flat)}, ids)
    plain = module.apply({"params": params}, ids)
    np.testing.assert_allclose(np.asarray(scaled), np.asarray(manual), atol=2e-5)
    assert np.abs(np.asarray(scaled) - np.asarray(plain)).max() > 1e-3
    with branch_scales(jnp.ones(4), group):
        np.testing.assert_array_equal(
            np.asarray(module.apply({"params": params}, ids)), np.asarray(plain)
        )


def test_layer_groups_number_the_layers_and_leave_the_head_out():
    trainable = {
        "bert": {
            "encoder": {
                "layer_1": {"q": {"lora_a": np.zeros(2)}},
                "layer_3": {"q": {"lora_a": np.zeros(2)}, "v": {"lora_b": np.zeros(2)}},
            }
        },
        "classifier": {"kernel": np.zeros(2)},
    }
    groups, by_layer = layer_groups(trainable)
    assert by_layer == {1: 0, 3: 1}
    flat = partition.flatten(groups)
    assert flat["bert/encoder/layer_3/v/lora_b"] == 1
    assert flat["bert/encoder/layer_1/q/lora_a"] == 0
    assert flat["classifier/kernel"] == -1
    assert layer_index_of("transformer/h_11/attn/c_attn") == 11
    assert layer_index_of("model/embed_tokens") is None


def _classify(model_dir, files, extra=()):
    overrides = tiny_overrides(model_dir, files)
    overrides += ["--config.peft.method=lora", "--config.optim.name=adamw", *extra]
    return load_config("configs/classify.py:runlocal", overrides)


def _causal(model_dir, files, extra=()):
    overrides = [f"--config.model.path={model_dir}", "--config.task=pairs"]
    overrides += [f"--config.data.data_files.{s}={p}" for s, p in files.items()]
    return load_config("configs/causal_lm.py:runlocal", [*overrides, *extra])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--config.ist.n_update=5"], r"ist\.n_update=5 but the model has 4 layers"),
        (["--config.ist.n_suppress=9"], r"ist\.n_suppress=9 but the model has 4 layers"),
        (["--config.peft.method=ia3"], r"per-layer PEFT method.*peft\.method='ia3'"),
        (["--config.optim.name=sgd"], r"optim\.name.*'sgd'"),
        (["--config.ist.interval=0"], r"ist\.interval must be >= 1"),
    ],
)
def test_bad_ist_settings_are_refused(tmp_path, bert4, tiny_task_files, extra, message):
    from pifi_jax.train.loop import setup_run

    config = _classify(bert4, tiny_task_files, ["--config.ist.mode=ist", *extra])
    with pytest.raises(ValueError, match=message):
        setup_run(config, tmp_path, log=_quiet)


def _records(workdir):
    return [json.loads(line) for line in open(workdir / "metrics.jsonl")]


def test_ist_run_on_an_encoder_logs_scores_and_plots_them(tmp_path, bert4, tiny_task_files):
    extra = ["--config.ist.mode=ist", "--config.ist.interval=2", "--config.ist.probe_batch_size=8"]
    extra += ["--config.train.num_steps=7", "--config.train.eval_every_steps=7"]
    results = train_and_evaluate(_classify(bert4, tiny_task_files, extra), tmp_path)
    assert 0.0 <= results["test/accuracy"] <= 1.0
    scored = [r for r in _records(tmp_path) if "ist/score/0" in r]
    # Refreshes before steps t = 2, 4, 6, recorded under the step they serve.
    assert [r["step"] for r in scored] == [3, 5, 7]
    history = np.array([[r[f"ist/score/{g}"] for g in range(LAYERS)] for r in scored])
    assert np.abs(history).max() > 0  # the probes' losses differed
    assert (tmp_path / "ist_scores.png").stat().st_size > 1000
    # The adapter loads as a plain LoRA adapter.
    module, params = pifi_jax.from_pretrained(
        bert4,
        task="classification",
        num_labels=2,
        peft=peft.read_adapter_config(tmp_path / "adapter"),
        log=_quiet,
    )
    peft.load_adapter(module, params, tmp_path / "adapter")


def test_rst_trains_uniformly_without_probes(tmp_path, llama4, tiny_pair_files):
    extra = [
        "--config.ist.mode=rst",
        "--config.train.num_steps=3",
        "--config.train.log_every_steps=1",
    ]
    train_and_evaluate(_causal(llama4, tiny_pair_files, extra), tmp_path)
    records = _records(tmp_path)
    assert not any("ist/score/0" in r for r in records)
    assert len([r for r in records if "train/loss" in r]) == 3
    assert not (tmp_path / "ist_scores.png").exists()


def _masked_adam_state(opt_state):
    from pifi_jax.ist.optim import LayerMaskedAdamState

    found = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, LayerMaskedAdamState))
        if isinstance(s, LayerMaskedAdamState)
    ]
    assert len(found) == 1
    return found[0]


def _ist_run(tmp_path, llama4, files):
    from pifi_jax.train.loop import setup_run

    extra = ["--config.ist.mode=ist", "--config.ist.n_update=1", "--config.data.buckets=(32,)"]
    extra += ["--config.ist.probe_batch_size=4", "--config.train.num_steps=50"]
    config = _causal(llama4, files, [*extra, "--config.optim.lr=0.05"])
    return setup_run(config, tmp_path, log=_quiet)


def _train_checking_layers(run, steps: int, interval: int):
    """Runs `steps` IST train steps (and the probe before every `interval`-th) as the loop does,
    asserting after each that exactly one layer trained and every other layer's leaves are
    bitwise unchanged; returns the final state."""
    from pifi_jax.train.loop import _global

    state, rng = run.state, jax.random.PRNGKey(0)
    _, by_layer = layer_groups(state.params)
    probe = iter(run.periodic_batches.batches(0))
    before = partition.flatten(jax.device_get(state.params))
    step, epoch = 0, 0
    while step < steps:
        for batch in run.train_batches.batches(epoch):
            if step and step % interval == 0:
                probe_batch = _global(next(probe), run.batch_sharding)
                extra, _ = run.periodic_step(state, probe_batch, jax.random.fold_in(rng, step))
                state = state.replace(extra=extra)
            counts = np.asarray(_masked_adam_state(state.opt_state).counts).copy()
            state, metrics = run.train_step(state, _global(batch, run.batch_sharding), rng)
            assert np.isfinite(float(metrics["loss"]))
            trained = np.asarray(_masked_adam_state(state.opt_state).counts) - counts
            assert trained.sum() == 1  # n_update = 1 layer trained this step
            after = partition.flatten(jax.device_get(state.params))
            for path, value in after.items():  # only that layer's leaves moved
                layer = layer_index_of(path)
                if layer is not None and not trained[by_layer[layer]]:
                    assert np.array_equal(value, before[path]), path
            before = after
            step += 1
            if step == steps:
                break
        epoch += 1
    return state


def test_one_compiled_step_and_probe_for_fifty_steps_of_changing_layers(
    tmp_path, llama4, tiny_pair_files
):
    run = _ist_run(tmp_path, llama4, tiny_pair_files)
    state = _train_checking_layers(run, 50, interval=10)
    counts = np.asarray(_masked_adam_state(state.opt_state).counts)
    assert counts.sum() == 50 and (counts > 0).sum() > 1  # the layers changed
    assert run.train_step._cache_size() == 1
    assert run.periodic_step._cache_size() == 1
    assert np.abs(np.asarray(state.extra["scores"])).max() > 0


def test_a_crashed_ist_run_resumes_bit_for_bit(tmp_path, llama4, tiny_pair_files, monkeypatch):
    extra = ["--config.ist.mode=ist", "--config.ist.interval=2", "--config.ist.probe_batch_size=4"]
    extra += ["--config.train.num_steps=6", "--config.train.log_every_steps=1"]
    whole = train_and_evaluate(_causal(llama4, tiny_pair_files, extra), tmp_path / "a")
    run_crashing_after(monkeypatch, 4, _causal(llama4, tiny_pair_files, extra), tmp_path / "b")
    resumed = train_and_evaluate(_causal(llama4, tiny_pair_files, extra), tmp_path / "b")

    def history(run):
        return [
            {k: v for k, v in r.items() if k.startswith(("train/", "ist/", "validation/"))}
            for r in _records(tmp_path / run)
            if "final/test/rougeL" not in r
        ]

    assert history("a") == history("b")
    assert sum("ist/score/0" in r for r in history("a")) == 2  # refreshes at t = 2, 4
    for key, value in whole.items():
        if "/" in key:  # the scores (not the timings)
            assert resumed[key] == value, key


FAMILY_METHODS = [
    pytest.param(family, method, marks=[] if fast else [pytest.mark.slow], id=f"{method}-{family}")
    for family in ("llama", "mistral", "qwen2", "gemma2", "falcon", "gpt2")
    for method in ("lora", "dora", "adapter_houlsby", "adapter_pfeiffer")
    for fast in [(family, method) in {("llama", "dora")}]
]


@pytest.mark.parametrize("family, method", FAMILY_METHODS)
def test_ist_steps_train_only_the_sampled_layer_on_every_family(
    tmp_path, tiny_pair_files, family, method
):
    from pifi_jax.train.loop import setup_run

    model = write_tiny_decoder(tmp_path / "model", family, layers=LAYERS)
    extra = ["--config.ist.mode=ist", "--config.ist.n_update=1", "--config.ist.interval=2"]
    extra += [f"--config.peft.method={method}", "--config.ist.probe_batch_size=4"]
    extra += ["--config.train.num_steps=20", "--config.optim.lr=0.05"]
    if method.startswith("adapter"):
        extra.append("--config.peft.bottleneck_size=4")
    run = setup_run(_causal(model, tiny_pair_files, extra), tmp_path / "run", log=_quiet)
    assert sorted(layer_groups(run.state.params)[1]) == list(range(LAYERS))
    state = _train_checking_layers(run, 6, interval=2)
    assert np.abs(np.asarray(state.extra["scores"])).max() > 0


def test_memory_benchmark_compares_the_three_steps():
    from benchmarks import ist_memory

    report = ist_memory.main(
        ["--layers=4", "--hidden=32", "--ffn=64", "--heads=4", "--vocab=64", "--r=2"]
        + ["--length=8", "--batch=2", "--n-update=1", "--arms=lora,ist"]
    )
    rows = {
        cells[0]: cells
        for cells in (
            [c.strip() for c in line.strip("|").split("|")] for line in report.splitlines()
        )
        if cells[0] in ist_memory.ARMS
    }
    assert set(rows) == {"lora", "ist"}
    assert rows["lora"][5] == "1.000"
    assert 0 < float(rows["ist"][5]) < 1.0  # the sparse gradients save even at this size
