"""Bridge transfer of LoRA modules and bottleneck adapters between T5 models
(pifi_jax/bridge/seq2seq_plug.py).

References: transformers' T5ForConditionalGeneration (forward hooks give each site's input and
output activations; Hugging Face PEFT loads the exported adapter), NumPy transcriptions of the
ridge fit and of the depth map, and the zeroed dense LLM (tests/test_bridge_t5.py) that the
pruned bridge equals.
"""

import copy
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import pifi_jax
from pifi_jax.bridge import adapt, fisher_seq2seq, seq2seq_bridge
from pifi_jax.bridge import seq2seq_plug as s2s
from pifi_jax.hub.pretrained import _flatten
from tests.test_bridge import assert_differentiates_no_llm_weight
from tests.test_bridge_t5 import VOCAB, _logits, _zeroed_t5, make_batches, write_t5

TARGETS = ("q", "v", "wi")
SITES = (
    "encoder.q", "decoder.q", "cross.q", "encoder.v", "decoder.v", "cross.v",
    "encoder.wi", "decoder.wi",
)  # fmt: skip
# Each site's input and output module in transformers' T5 (block index {i}).
HF_SITES = {
    "encoder.q": ("encoder.block.{i}.layer.0.layer_norm", "encoder.block.{i}.layer.0.SelfAttention.q"),
    "encoder.v": ("encoder.block.{i}.layer.0.layer_norm", "encoder.block.{i}.layer.0.SelfAttention.v"),
    "decoder.q": ("decoder.block.{i}.layer.0.layer_norm", "decoder.block.{i}.layer.0.SelfAttention.q"),
    "decoder.v": ("decoder.block.{i}.layer.0.layer_norm", "decoder.block.{i}.layer.0.SelfAttention.v"),
    "cross.q": ("decoder.block.{i}.layer.1.layer_norm", "decoder.block.{i}.layer.1.EncDecAttention.q"),
    "cross.v": ("encoder.final_layer_norm", "decoder.block.{i}.layer.1.EncDecAttention.v"),
    "encoder.wi": ("encoder.block.{i}.layer.1.layer_norm", "encoder.block.{i}.layer.1.DenseReluDense.wi"),
    "decoder.wi": ("decoder.block.{i}.layer.2.layer_norm", "decoder.block.{i}.layer.2.DenseReluDense.wi"),
}  # fmt: skip
SOURCE_SIDE = ("encoder.", "EncDecAttention.k", "EncDecAttention.v")


def write_slm(directory):
    """A 12-wide T5 with 2 encoder and 2 decoder blocks (the LLM: 16 wide, 2 and 3)."""
    torch.manual_seed(3)
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=12, d_kv=4, d_ff=20, num_layers=2, num_decoder_layers=2,
        num_heads=3, relative_attention_num_buckets=8, relative_attention_max_distance=16,
        dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    model = transformers.T5ForConditionalGeneration(config).eval()
    model.save_pretrained(directory)
    return model


def lora_config():
    return pifi_jax.peft.LoraConfig(r=2, lora_alpha=4.0, target_modules=list(TARGETS))


@pytest.fixture(scope="module")
def t5_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5_transfer")
    slm_torch = write_slm(root / "slm")
    llm_torch = write_t5(root / "llm", gated=False, tied=True, seed=1)
    quiet = dict(task="seq2seq", log=lambda s: None)
    slm = pifi_jax.from_pretrained(str(root / "slm"), **quiet)
    llm = pifi_jax.from_pretrained(str(root / "llm"), **quiet)
    # the SLM's LoRA modules, trained-looking: B random instead of zero
    _, peft_params = pifi_jax.peft.wrap(*slm, lora_config(), seed=0)
    rng = np.random.default_rng(0)
    flat = {
        p: (rng.normal(size=v.shape).astype(np.float32) * 0.5 if p.endswith("lora_b") else v)
        for p, v in _flatten(peft_params).items()
    }
    sites = s2s.sites_for(TARGETS, slm[0].config)
    modules = s2s.slm_modules(flat, sites, slm[0].config)
    batches = make_batches(4)
    plug = s2s.fit_plug(slm, llm, batches, sites)
    scores = fisher_seq2seq.seq2seq_fisher_scores(str(root / "llm"), batches, log=lambda s: None)
    return {
        "root": root, "slm": slm, "llm": llm, "slm_torch": slm_torch, "llm_torch": llm_torch,
        "modules": modules, "plug": plug, "batches": batches, "scores": scores,
    }  # fmt: skip


def test_sites_expand_peft_targets_and_refuse_the_rest(t5_pair):
    config = t5_pair["slm"][0].config
    assert set(s2s.sites_for(TARGETS, config)) == set(SITES)
    with pytest.raises(ValueError, match=r"supports the targets \['q', 'k', 'v', 'wi'\].*'o'"):
        s2s.sites_for(["q", "o"], config)
    with pytest.raises(ValueError, match="'wi_0'"):
        s2s.sites_for(["wi_0"], config)  # a relu T5 has wi, not the gated pair
    gated = SimpleNamespace(is_gated_act=True)
    assert s2s.sites_for(["wi_0", "wi_1"], gated) == (
        "encoder.wi_0", "decoder.wi_0", "encoder.wi_1", "decoder.wi_1",
    )  # fmt: skip
    assert s2s.SITES["decoder.wi_1"].path(2) == "decoder/block_2/layer_2/DenseReluDense/wi_1"
    assert s2s.SITES["cross.k"].input_path(1) == "encoder/final_layer_norm"
    with pytest.raises(ValueError, match="'wi'"):
        s2s.sites_for(["wi"], gated)
    with pytest.raises(ValueError, match=r"T5 adapter sites are .*got \['encoder.q'\]"):
        s2s.check_sites("adapter", ["encoder.q"])
    with pytest.raises(ValueError, match="no prefix tuning for T5"):
        s2s.check_sites("prefix", ["encoder.q"])
    with pytest.raises(ValueError, match="lack encoder/block_0/layer_0/SelfAttention/q/lora_a"):
        s2s.slm_modules({}, ["encoder.q"], config)


def _hf_activations(model, batch, names):
    """{module name: [real tokens, width]} of transformers' T5 (forward hooks)."""
    got, hooks = {}, []
    modules = dict(model.named_modules())
    for name in names:
        hook = lambda m, i, o, name=name: got.__setitem__(name, o.detach().numpy())  # noqa: E731
        hooks.append(modules[name].register_forward_hook(hook))
    tgt = torch.tensor(batch["target_ids"], dtype=torch.long)
    start = torch.zeros((tgt.shape[0], 1), dtype=torch.long)
    with torch.no_grad():
        model(
            input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
            attention_mask=torch.tensor(batch["attention_mask"]),
            decoder_input_ids=torch.cat([start, tgt[:, :-1]], dim=1),
            decoder_attention_mask=torch.tensor(batch["target_mask"]),
            use_cache=False,
        )
    for h in hooks:
        h.remove()
    out = {}
    for name, value in got.items():
        source = name.startswith(SOURCE_SIDE[0]) or name.endswith(SOURCE_SIDE[1:])
        real = batch["attention_mask" if source else "target_mask"] > 0
        out[name] = value.astype(np.float64)[real]
    return out


def _numpy_ridge(x, y, ridge=1e-3):
    gram = x.T @ x
    lam = ridge * np.trace(gram) / gram.shape[0]
    return np.linalg.inv(gram + lam * np.eye(len(gram))) @ x.T @ y


def test_w_plug_is_the_ridge_map_of_each_sites_activations_in_transformers(t5_pair):
    slm, llm = t5_pair["slm_torch"], t5_pair["llm_torch"]
    # the depth maps, transcribed: LLM block j takes SLM block floor(j * L_slm / L_llm)
    maps = {"encoder": [0, 1], "decoder": [0, 0, 1]}
    for site in SITES:
        stack = "encoder" if site.startswith("encoder") else "decoder"
        rows = {k: [] for k in ("xs", "xl", "ys", "yl")}
        for batch in t5_pair["batches"]:
            names = [n.format(i=i) for n in HF_SITES[site] for i in range(3)]
            a_s = _hf_activations(
                slm, batch, [n for n in set(names) if n in dict(slm.named_modules())]
            )
            a_l = _hf_activations(
                llm, batch, [n for n in set(names) if n in dict(llm.named_modules())]
            )
            x, y = HF_SITES[site]
            for j, i in enumerate(maps[stack]):
                rows["xs"].append(a_s[x.format(i=i)])
                rows["xl"].append(a_l[x.format(i=j)])
                rows["ys"].append(a_s[y.format(i=i)])
                rows["yl"].append(a_l[y.format(i=j)])
        xs, xl, ys, yl = (np.concatenate(rows[k]) for k in ("xs", "xl", "ys", "yl"))
        got = t5_pair["plug"][site]
        assert got["in"].shape == (16, 12) and got["out"].shape[0] == ys.shape[1]
        np.testing.assert_allclose(got["in"], _numpy_ridge(xl, xs), atol=2e-4, rtol=2e-3)
        np.testing.assert_allclose(got["out"], _numpy_ridge(ys, yl), atol=2e-4, rtol=2e-3)


def _trainable(t5_pair, r):
    llm_config = t5_pair["llm"][0].config
    selection = seq2seq_bridge.select_seq2seq(t5_pair["scores"], llm_config, r)
    tree = adapt.init_transfer(t5_pair["modules"], t5_pair["plug"], selection, llm_config)
    return selection, tree


def test_plugged_modules_equal_the_carried_loras_in_hugging_face_peft(t5_pair, tmp_path):
    import peft as hf_peft

    _, trainable = _trainable(t5_pair, 4)
    module, params = adapt.plugged_llm(t5_pair["llm"], lora_config(), trainable)
    adapt.export_llm_adapter(module, params, tmp_path / "adapter")
    base = copy.deepcopy(t5_pair["llm_torch"])  # PEFT injects its layers in place
    theirs = hf_peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    weights = {n: p.detach().numpy() for n, p in theirs.named_parameters() if "lora_" in n}
    assert len(weights) == 2 * (2 * 8 + 5)  # A, B of q, v in 8 attentions and of wi in 5 MLPs
    maps = {"encoder": [0, 1], "decoder": [0, 0, 1]}
    modules, plug = t5_pair["modules"], t5_pair["plug"]
    for site in SITES:
        stack = "encoder" if site.startswith("encoder") else "decoder"
        for j, i in enumerate(maps[stack]):
            hf = "base_model.model." + HF_SITES[site][1].format(i=j)
            a = plug[site]["in"] @ np.asarray(modules[site]["a"][i])  # by hand: P_in A, B P_out
            b = np.asarray(modules[site]["b"][i]) @ plug[site]["out"]
            np.testing.assert_allclose(weights[f"{hf}.lora_A.default.weight"].T, a, atol=1e-6)
            np.testing.assert_allclose(weights[f"{hf}.lora_B.default.weight"].T, b, atol=1e-6)
    batch = t5_pair["batches"][0]
    tgt = torch.tensor(batch["target_ids"], dtype=torch.long)
    with torch.no_grad():
        want = theirs(
            input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
            attention_mask=torch.tensor(batch["attention_mask"]),
            decoder_input_ids=torch.cat([torch.zeros_like(tgt[:, :1]), tgt[:, :-1]], dim=1),
            decoder_attention_mask=torch.tensor(batch["target_mask"]),
        ).logits.numpy()
    real = batch["target_mask"] > 0
    got = _logits(module, params, batch)
    np.testing.assert_allclose(got[real], want[real], atol=3e-5)
    plain = _logits(*t5_pair["llm"], batch)
    assert np.abs(plain[real] - got[real]).max() > 1e-2  # the modules change the LLM


def assert_bridge_equals_zeroed_llm(t5_pair, selection, trainable, peft_config, r, restrict=False):
    """The pruned bridge with its leaves (returned) gives the logits of the dense LLM with the
    dropped parts zeroed and the LLM's leaves plugged (restrict: only what the bridge keeps of
    them, as for adapters, whose up projection writes every residual dimension)."""
    from tests.test_bridge import restricted

    llm_module, llm_params = t5_pair["llm"]
    small = seq2seq_bridge.prune_seq2seq(
        str(t5_pair["root"] / "llm"), selection, log=lambda s: None
    )
    peft_bridge, bridge_params = pifi_jax.peft.wrap(*small, peft_config, seed=0)
    leaves = adapt.bridge_leaves(trainable, selection, llm_module.config)
    bridge_params = adapt.with_leaves(_flatten(bridge_params), leaves)
    dense = _zeroed_t5(llm_params, llm_module.config, selection) if r > 1 else llm_params
    peft_llm, peft_llm_params = pifi_jax.peft.wrap(llm_module, dense, peft_config, seed=0)
    llm_leaves = adapt.llm_leaves(trainable, llm_module.config)
    if restrict:
        llm_leaves = restricted(llm_leaves, selection, llm_module.config.d_model)
    plugged = adapt.with_leaves(_flatten(peft_llm_params), llm_leaves)
    for batch in t5_pair["batches"]:
        real = batch["target_mask"] > 0
        got = _logits(peft_bridge, bridge_params, batch)[real]
        want = _logits(peft_llm, plugged, batch)[real]
        np.testing.assert_allclose(got, want, atol=3e-5, rtol=1e-5)
    return leaves


@pytest.mark.parametrize("r", [1, 4])
def test_the_bridge_starts_as_the_zeroed_llm_with_the_plugged_loras(t5_pair, r):
    llm_module = t5_pair["llm"][0]
    selection, trainable = _trainable(t5_pair, r)
    leaves = assert_bridge_equals_zeroed_llm(t5_pair, selection, trainable, lora_config(), r)
    # the bridge's leaves, by hand: A_b = W_down A_l (the kept rows), B_b = B_l's kept columns
    llm_leaves = adapt.llm_leaves(trainable, llm_module.config)
    hid, d_kv = selection.hidden, llm_module.config.d_kv
    cols = lambda heads: (np.asarray(heads)[:, None] * d_kv + np.arange(d_kv)).ravel()  # noqa: E731
    kept = {
        "decoder/block_1/layer_1/EncDecAttention/q": cols(selection.cross_heads[1]),
        "encoder/block_0/layer_0/SelfAttention/v": cols(selection.encoder_heads),
        "decoder/block_2/layer_0/SelfAttention/q": cols(selection.decoder_heads),
        "decoder/block_2/layer_2/DenseReluDense/wi": selection.decoder_ffn[2],
    }
    for path, columns in kept.items():
        a_l, b_l = (np.asarray(llm_leaves[f"{path}/lora_{x}"]) for x in "ab")
        np.testing.assert_allclose(np.asarray(leaves[f"{path}/lora_a"]), a_l[hid], atol=1e-6)
        np.testing.assert_allclose(np.asarray(leaves[f"{path}/lora_b"]), b_l[:, columns])


def test_adapting_a_t5_bridge_differentiates_no_llm_weight(t5_pair):
    llm_module, llm_params = t5_pair["llm"]
    selection, trainable = _trainable(t5_pair, 4)
    small = seq2seq_bridge.prune_seq2seq(
        str(t5_pair["root"] / "llm"), selection, log=lambda s: None
    )
    peft_bridge, bridge_params = pifi_jax.peft.wrap(*small, lora_config(), seed=0)
    frozen = _flatten(bridge_params)
    kw = dict(module=peft_bridge, selection=selection, llm_config=llm_module.config)
    batch = {k: jnp.asarray(v) for k, v in t5_pair["batches"][0].items()}

    def loss(t):
        return adapt.adapt_loss(t, frozen, batch, **kw)

    # the loss is the bridge's mean target-token cross-entropy
    params = adapt.with_leaves(frozen, adapt.bridge_leaves(trainable, selection, llm_module.config))
    logits = _logits(peft_bridge, params, t5_pair["batches"][0])
    mask = t5_pair["batches"][0]["target_mask"] > 0
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = np.take_along_axis(logp, t5_pair["batches"][0]["target_ids"][..., None], -1)[..., 0]
    np.testing.assert_allclose(float(loss(trainable)), -picked[mask].mean(), rtol=1e-5)
    assert_differentiates_no_llm_weight(loss, trainable, (frozen, batch), llm_params)


# ---------------------------------------------------------------------------------------------
# Bottleneck adapters (Houlsby: after every o and wo): each site's input and output is its
# projection's output in transformers' T5.
HF_ADAPTER_SITES = {
    "encoder.o": "encoder.block.{i}.layer.0.SelfAttention.o",
    "decoder.o": "decoder.block.{i}.layer.0.SelfAttention.o",
    "cross.o": "decoder.block.{i}.layer.1.EncDecAttention.o",
    "encoder.wo": "encoder.block.{i}.layer.1.DenseReluDense.wo",
    "decoder.wo": "decoder.block.{i}.layer.2.DenseReluDense.wo",
}


def adapter_config():
    return pifi_jax.peft.AdapterConfig(kind="houlsby", bottleneck_size=3, train_layernorms=False)


@pytest.fixture(scope="module")
def t5_adapters(t5_pair):
    _, peft_params = pifi_jax.peft.wrap(*t5_pair["slm"], adapter_config(), seed=0)
    rng = np.random.default_rng(1)
    flat = {  # trained-looking: every adapter leaf random (up and the biases start at zero)
        p: (rng.normal(size=v.shape).astype(np.float32) * 0.5 if "/adapter_" in p else v)
        for p, v in _flatten(peft_params).items()
    }
    sites = s2s.adapter_sites_for("houlsby")
    modules = s2s.slm_modules(flat, sites, t5_pair["slm"][0].config)
    plug = s2s.fit_plug(t5_pair["slm"], t5_pair["llm"], t5_pair["batches"], sites)
    return {"flat": flat, "sites": sites, "modules": modules, "plug": plug}


def test_adapter_sites_and_their_w_plug_in_transformers(t5_pair, t5_adapters):
    assert set(t5_adapters["sites"]) == set(HF_ADAPTER_SITES)
    assert s2s.adapter_sites_for("pfeiffer") == ("encoder.wo", "decoder.wo")
    assert s2s.adapter_sites_for("houlsby", ["o"]) == ("encoder.o", "decoder.o", "cross.o")
    with pytest.raises(ValueError, match=r"projections \['o', 'wo'\].*\['q'\]"):
        s2s.adapter_sites_for("houlsby", ["q"])
    with pytest.raises(ValueError, match="T5 adapter sites are"):
        s2s.check_sites("adapter", ["encoder.q"])
    with pytest.raises(ValueError, match="no prefix tuning for T5"):
        s2s.check_sites("prefix", ["encoder.q"])
    with pytest.raises(ValueError, match="lack encoder/block_0/layer_1/DenseReluDense/adapter_"):
        s2s.slm_modules({}, ["encoder.wo"], t5_pair["slm"][0].config)
    modules = t5_adapters["modules"]
    assert modules["cross.o"]["down"].shape == (2, 12, 3)  # [SLM decoder blocks, d_s, m]
    assert modules["encoder.wo"]["up_bias"].shape == (2, 12)
    # W_plug: ridge maps between the projection's outputs, LLM -> SLM (in) and SLM -> LLM (out)
    maps = {"encoder": [0, 1], "decoder": [0, 0, 1]}
    slm, llm = t5_pair["slm_torch"], t5_pair["llm_torch"]
    for site, name in HF_ADAPTER_SITES.items():
        stack = site.split(".")[0].replace("cross", "decoder")
        ys, yl = [], []
        for batch in t5_pair["batches"]:
            a_s = _hf_activations(slm, batch, [name.format(i=i) for i in range(2)])
            a_l = _hf_activations(llm, batch, [name.format(i=j) for j in range(len(maps[stack]))])
            for j, i in enumerate(maps[stack]):
                ys.append(a_s[name.format(i=i)])
                yl.append(a_l[name.format(i=j)])
        ys, yl = np.concatenate(ys), np.concatenate(yl)
        got = t5_adapters["plug"][site]
        assert got["in"].shape == (16, 12) and got["out"].shape == (12, 16)
        np.testing.assert_allclose(got["in"], _numpy_ridge(yl, ys), atol=2e-4, rtol=2e-3)
        np.testing.assert_allclose(got["out"], _numpy_ridge(ys, yl), atol=2e-4, rtol=2e-3)


def _adapter_trainable(t5_pair, t5_adapters, r):
    llm_config = t5_pair["llm"][0].config
    selection = seq2seq_bridge.select_seq2seq(t5_pair["scores"], llm_config, r)
    modules, plug = t5_adapters["modules"], t5_adapters["plug"]
    return selection, adapt.init_transfer(modules, plug, selection, llm_config)


def test_plugged_adapters_equal_the_carried_adapters_hooked_into_transformers(
    t5_pair, t5_adapters, tmp_path
):
    _, trainable = _adapter_trainable(t5_pair, t5_adapters, 4)
    module, params = adapt.plugged_llm(t5_pair["llm"], adapter_config(), trainable)
    maps = {"encoder": [0, 1], "decoder": [0, 0, 1]}
    modules, plug = t5_adapters["modules"], t5_adapters["plug"]
    hf = dict(t5_pair["llm_torch"].named_modules())
    handles = []
    for site, name in HF_ADAPTER_SITES.items():
        stack = site.split(".")[0].replace("cross", "decoder")
        for j, i in enumerate(maps[stack]):
            m = {k: np.asarray(v[i]) for k, v in modules[site].items()}
            p_in, p_out = plug[site]["in"], plug[site]["out"]
            w = {  # by hand: act(h P_in D + d) (U P_out) + u P_out
                "down": p_in @ m["down"], "d": m["down_bias"],
                "up": m["up"] @ p_out, "u": m["up_bias"] @ p_out,
            }  # fmt: skip
            w = {k: torch.tensor(v) for k, v in w.items()}

            def hook(_, __, out, w=w):
                return out + torch.relu(out @ w["down"] + w["d"]) @ w["up"] + w["u"]

            handles.append(hf[name.format(i=j)].register_forward_hook(hook))
    batch = t5_pair["batches"][0]
    tgt = torch.tensor(batch["target_ids"], dtype=torch.long)
    try:
        with torch.no_grad():
            want = t5_pair["llm_torch"](
                input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
                attention_mask=torch.tensor(batch["attention_mask"]),
                decoder_input_ids=torch.cat([torch.zeros_like(tgt[:, :1]), tgt[:, :-1]], dim=1),
                decoder_attention_mask=torch.tensor(batch["target_mask"]),
            ).logits.numpy()
    finally:
        for h in handles:
            h.remove()
    assert len(handles) == 2 * 2 + 3 * 3  # encoder: o, wo; decoder: o, cross o, wo
    real = batch["target_mask"] > 0
    got = _logits(module, params, batch)
    np.testing.assert_allclose(got[real], want[real], atol=3e-5)
    assert np.abs(_logits(*t5_pair["llm"], batch)[real] - got[real]).max() > 1e-2
    # exported in pifi_jax's native format (PEFT has no bottleneck adapters), and reloaded
    out = adapt.export_llm_adapter(module, params, tmp_path / "adapter")
    fresh, fresh_params = pifi_jax.peft.wrap(*t5_pair["llm"], adapter_config(), seed=5)
    loaded = pifi_jax.peft.load_adapter(fresh, fresh_params, out)
    np.testing.assert_allclose(_logits(fresh, loaded, batch)[real], got[real], atol=1e-6)


@pytest.mark.parametrize("r", [1, 4])
def test_the_bridge_starts_as_the_zeroed_llm_with_the_plugged_adapters(t5_pair, t5_adapters, r):
    llm_module = t5_pair["llm"][0]
    selection, trainable = _adapter_trainable(t5_pair, t5_adapters, r)
    assert trainable["down"].shape == (len(selection.hidden), 16)
    leaves = assert_bridge_equals_zeroed_llm(
        t5_pair, selection, trainable, adapter_config(), r, restrict=True
    )
    llm_leaves = adapt.llm_leaves(trainable, llm_module.config)
    # the bridge's leaves, by hand: D_b = W_down D_l, U_b and u_b the kept residual dimensions
    hid = selection.hidden
    host = "decoder/block_1/layer_1/EncDecAttention"
    d_l, u_l, ub_l = (np.asarray(llm_leaves[f"{host}/adapter_{k}"]) for k in (
        "down/kernel", "up/kernel", "up/bias"))  # fmt: skip
    np.testing.assert_allclose(np.asarray(leaves[f"{host}/adapter_down/kernel"]), d_l[hid])
    np.testing.assert_allclose(np.asarray(leaves[f"{host}/adapter_up/kernel"]), u_l[:, hid])
    np.testing.assert_allclose(np.asarray(leaves[f"{host}/adapter_up/bias"]), ub_l[hid])
