"""Bridge pruning of a GPT-2 LLM (fused c_attn, LayerNorm, learned positions, tied head).

References: the empirical Fisher from transformers' GPT2LMHeadModel (one backward per example),
the importance aggregates and the selection rule transcribed in NumPy for GPT-2's tensors, and
transformers' GPT-2 with the dropped dimensions, heads and units zeroed and every LayerNorm
normalising over the kept dimensions only (what a GPT-2 bridge is, prune.py's docstring).
"""

import types

import numpy as np
import pytest
import torch
import transformers

import pifi_jax
from pifi_jax import bridge
from pifi_jax.models import registry
from tests.test_bridge import VOCAB, _logits, _torch_logits, make_batches, torch_fisher

HD = 8  # head_dim


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(1)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=48,
        n_layer=3,
        n_head=6,
        n_inner=40,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        pad_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # non-trivial LayerNorm weights and every bias, so each is tested
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or "ln_f.w" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    batches = make_batches(seed=3)
    scores = bridge.fisher_scores(str(directory), batches, keep_full=True, log=lambda s: None)
    module = pifi_jax.from_pretrained(str(directory), task="causal_lm", log=lambda s: None)
    return {"dir": directory, "model": model, "batches": batches, "scores": scores, "llm": module}


def _flax_path(name: str) -> str:
    path = name.replace("transformer.h.", "transformer/h_").replace(".", "/")
    for old, new in (("/weight", "/kernel"), ("wte/kernel", "wte/embedding")):
        path = path.replace(old, new)
    path = path.replace("wpe/kernel", "wpe/embedding")
    if "/ln_" in path:
        path = path.replace("/kernel", "/scale")
    return path


def test_gpt2_fisher_matches_torch_per_example_gradients(gpt2):
    reference, count = torch_fisher(gpt2["model"], gpt2["batches"])
    assert gpt2["scores"].examples == count
    flat = gpt2["scores"].full
    assert set(flat) == {_flax_path(n) for n in reference if n != "lm_head.weight"}
    for name, h in reference.items():
        if name == "lm_head.weight":
            continue  # tied to wte: the embedding's H holds both uses
        # Conv1D weights are stored [in, out], as our kernels: no transpose
        ours = flat[_flax_path(name)]
        np.testing.assert_allclose(ours, h, rtol=2e-4, atol=1e-6 * np.abs(h).max(), err_msg=name)


def numpy_gpt2_scores(h: dict, cfg) -> dict:
    """The spec's aggregates for GPT-2's tensors (torch names; Conv1D weights [in, out])."""
    d, layers, n = cfg.n_embd, cfg.n_layer, cfg.n_head
    f = cfg.n_inner

    def heads(x, axis):  # per-head sums of a d-wide axis
        x = np.moveaxis(x, axis, 0)
        return x.reshape(n, HD, -1).sum((1, 2))

    hidden = h["transformer.wte.weight"].sum(0) + h["transformer.wpe.weight"].sum(0)
    hidden = hidden + h["transformer.ln_f.weight"] + h["transformer.ln_f.bias"]
    q, kv, ffn = np.zeros((layers, n)), np.zeros((layers, n)), np.zeros((layers, f))
    for i in range(layers):
        g = {k[len(f"transformer.h.{i}.") :]: v for k, v in h.items() if f".h.{i}." in k}
        for ln in ("ln_1", "ln_2"):
            hidden = hidden + g[f"{ln}.weight"] + g[f"{ln}.bias"]
        w, b = g["attn.c_attn.weight"], g["attn.c_attn.bias"]  # [d, 3d], [3d]
        hidden = hidden + w.sum(1)
        q[i] += heads(w[:, :d], 1) + heads(b[:d, None], 0)
        kv[i] += heads(w[:, d : 2 * d], 1) + heads(w[:, 2 * d :], 1)
        kv[i] += heads(b[d : 2 * d, None], 0) + heads(b[2 * d :, None], 0)
        o = g["attn.c_proj.weight"]  # [d (heads), d]
        q[i] += heads(o, 0)
        hidden = hidden + o.sum(0) + g["attn.c_proj.bias"]
        fc = g["mlp.c_fc.weight"]  # [d, f]
        hidden = hidden + fc.sum(1)
        ffn[i] += fc.sum(0) + g["mlp.c_fc.bias"]
        down = g["mlp.c_proj.weight"]  # [f, d]
        ffn[i] += down.sum(1)
        hidden = hidden + down.sum(0) + g["mlp.c_proj.bias"]
    return {"hidden": hidden, "q": q, "kv": kv, "ffn": ffn}


def numpy_gpt2_selection(s: dict, cfg, r: float) -> dict:
    """No GQA: a head's score is its q plus its k and v blocks; the width is heads x head_dim."""

    def top(x, k):
        return sorted(sorted(range(len(x)), key=lambda j: (-x[j], j))[:k])

    f = np.sqrt(r)
    n = max(1, round(cfg.n_head / f))
    out = {"hidden": top(s["hidden"], n * HD), "q": [], "ffn": []}
    for i in range(cfg.n_layer):
        out["q"].append(top(s["q"][i] + s["kv"][i], n))
        out["ffn"].append(top(s["ffn"][i], max(1, round(cfg.n_inner / f))))
    return out


def test_gpt2_selection_keeps_the_brute_force_top_rows_and_columns(gpt2):
    reference, _ = torch_fisher(gpt2["model"], gpt2["batches"])
    cfg = gpt2["model"].config
    want_scores = numpy_gpt2_scores(reference, cfg)
    scores = gpt2["scores"]
    for ours, key in ((scores.hidden, "hidden"), (scores.q_heads, "q"), (scores.ffn, "ffn")):
        np.testing.assert_allclose(ours, want_scores[key], rtol=2e-4, err_msg=key)
    np.testing.assert_allclose(scores.kv_groups, want_scores["kv"], rtol=2e-4)
    config = gpt2["llm"][0].config
    for r in (2, 4, 16):
        want = numpy_gpt2_selection(want_scores, cfg, r)
        got = bridge.select(scores, config, r)
        assert got.hidden.tolist() == want["hidden"], r
        assert [q.tolist() for q in got.q_heads] == want["q"], r
        assert [g.tolist() for g in got.kv_groups] == want["q"], r  # a head is its own group
        assert [u.tolist() for u in got.ffn] == want["ffn"], r
        sizes = bridge.bridge_sizes(config, r)
        assert sizes.hidden == sizes.heads * HD


def test_gpt2_reduction_one_is_the_llm(gpt2):
    module, params = gpt2["llm"]
    selection = bridge.select(gpt2["scores"], module.config, 1)
    small, small_params = bridge.prune(str(gpt2["dir"]), selection, log=lambda s: None)
    assert small.config == module.config
    batch = gpt2["batches"][0]
    np.testing.assert_allclose(
        _logits(small, small_params, batch), _logits(module, params, batch), atol=1e-5
    )


class _KeptLayerNorm(torch.nn.Module):
    """A LayerNorm over the kept dimensions only, zero elsewhere (the bridge's norm, in the
    dense model's width)."""

    def __init__(self, ln: torch.nn.LayerNorm, keep: np.ndarray):
        super().__init__()
        self.ln, self.keep = ln, torch.tensor(keep)

    def forward(self, x):
        kept = torch.nn.functional.layer_norm(
            x[..., self.keep],
            (len(self.keep),),
            self.ln.weight[self.keep],
            self.ln.bias[self.keep],
            self.ln.eps,
        )
        return torch.zeros_like(x).index_copy(-1, self.keep, kept)


def _zeroed_torch_gpt2(directory, sel) -> transformers.GPT2LMHeadModel:
    model = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
    d = model.config.n_embd
    drop_h = torch.tensor(np.setdiff1d(np.arange(d), sel.hidden))
    with torch.no_grad():
        model.transformer.wte.weight[:, drop_h] = 0  # the tied head reads the same columns
        model.transformer.wpe.weight[:, drop_h] = 0
        for i, block in enumerate(model.transformer.h):
            cols = np.arange(d).reshape(-1, HD)
            q_keep = cols[sel.q_heads[i]].ravel()
            kv_keep = cols[sel.kv_groups[i]].ravel()
            keep = np.concatenate([q_keep, d + kv_keep, 2 * d + kv_keep])
            drop = torch.tensor(np.setdiff1d(np.arange(3 * d), keep))
            block.attn.c_attn.weight[:, drop] = 0
            block.attn.c_attn.bias[drop] = 0
            block.attn.c_proj.weight[torch.tensor(np.setdiff1d(np.arange(d), q_keep))] = 0
            units = torch.tensor(np.setdiff1d(np.arange(model.config.n_inner), sel.ffn[i]))
            block.mlp.c_fc.weight[:, units] = 0
            block.mlp.c_fc.bias[units] = 0
            block.mlp.c_proj.weight[units] = 0
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight[:, drop_h] = 0
                proj.bias[drop_h] = 0
            block.ln_1 = _KeptLayerNorm(block.ln_1, sel.hidden)
            block.ln_2 = _KeptLayerNorm(block.ln_2, sel.hidden)
        model.transformer.ln_f = _KeptLayerNorm(model.transformer.ln_f, sel.hidden)
    return model


@pytest.mark.parametrize("r", [pytest.param(4, marks=pytest.mark.slow), 16])
def test_gpt2_bridge_is_the_zeroed_llm_normalised_over_the_kept_dimensions(gpt2, r, tmp_path):
    config = gpt2["llm"][0].config
    selection = bridge.select(gpt2["scores"], config, r)
    small, small_params = bridge.prune(str(gpt2["dir"]), selection, log=lambda s: None)
    assert small.config.n_embd == len(selection.hidden) < config.n_embd
    assert small.config.n_head == len(selection.q_heads[0]) < config.n_head
    reference = _zeroed_torch_gpt2(gpt2["dir"], selection)
    for batch in gpt2["batches"]:
        real = batch["attention_mask"] > 0
        want = _torch_logits(reference, batch)
        got = _logits(small, small_params, batch)
        np.testing.assert_allclose(got[real], want[real], atol=3e-5, rtol=1e-5)
    # the saved bridge is a GPT-2 checkpoint that transformers loads, with the same logits
    out = bridge.save_bridge(
        small, small_params, tmp_path / "b", llm=str(gpt2["dir"]), selection=selection, reduction=r
    )
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(loaded, transformers.GPT2LMHeadModel)
    batch = gpt2["batches"][1]
    real = batch["attention_mask"] > 0
    np.testing.assert_allclose(
        _torch_logits(loaded, batch)[real], _logits(small, small_params, batch)[real], atol=3e-5
    )
    # not trivially so: the unpruned GPT-2 computes something else
    assert np.abs(_torch_logits(gpt2["model"], batch) - _torch_logits(loaded, batch)).max() > 1e-2


def test_gpt2_bridge_shape_rule():
    """gpt2-xl at the paper's r = 16: 25 heads of 64 -> 6 heads, 384 wide, 1600 MLP units."""
    config = registry.config_from_hf(
        {"model_type": "gpt2", "n_embd": 1600, "n_head": 25, "n_layer": 48}
    )
    sizes = bridge.bridge_sizes(config, 16)
    assert (sizes.hidden, sizes.heads, sizes.intermediate) == (384, 6, 1600)
    bad = types.SimpleNamespace(
        hidden=np.arange(40), q_heads=[np.arange(4)], kv_groups=[np.arange(4)], ffn=[np.arange(9)]
    )
    with pytest.raises(ValueError, match="keeps whole heads of head_dim 64"):
        bridge.bridge_config(config, bad)


# --- W_plug and modules carried into a GPT-2 LLM ----------------------------------------------

SITES = {
    "lora": ("c_attn", "c_fc"),
    "adapter": ("attn.c_proj", "mlp.c_proj"),
    "prefix": ("c_attn.key", "c_attn.value"),
}


@pytest.fixture(scope="module")
def gpt2_pair(gpt2, tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt2_slm")
    torch.manual_seed(2)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=16, n_layer=2, n_head=4, n_inner=24,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0,
    )  # fmt: skip
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)
    slm = pifi_jax.from_pretrained(str(directory), task="causal_lm", log=lambda s: None)
    return {"slm": slm, "llm": gpt2["llm"], "llm_dir": gpt2["dir"], "scores": gpt2["scores"]}


def test_gpt2_plug_is_the_least_squares_map_of_the_sites_activations(gpt2_pair):
    """A prefix's keys live in the middle third of c_attn's output, its values in the last;
    c_fc's input is ln_2's output."""
    from pifi_jax.bridge.plug import activations

    batches = make_batches(4, rows=(4, 4))
    plug = bridge.fit_plug(
        gpt2_pair["slm"], gpt2_pair["llm"], batches, SITES["prefix"], method="prefix", ridge=0.0
    )
    assert plug["c_attn.key"]["out"].shape == (16, 48) and set(plug["c_attn.key"]) == {"out"}
    ys, yl = [], []
    for b in batches:
        a_s = activations(*gpt2_pair["slm"], b, ["attn/c_attn"])
        a_l = activations(*gpt2_pair["llm"], b, ["attn/c_attn"])
        for j, i in enumerate(bridge.depth_map(2, 3)):
            ys.append(a_s[(i, "attn/c_attn")])  # [tokens, 3 x 16]
            yl.append(a_l[(j, "attn/c_attn")])  # [tokens, 3 x 48]
    ys, yl = np.concatenate(ys), np.concatenate(yl)
    for site, third in (("c_attn.key", 1), ("c_attn.value", 2)):
        want = np.linalg.lstsq(
            ys[:, 16 * third : 16 * (third + 1)], yl[:, 48 * third : 48 * (third + 1)], rcond=None
        )[0]
        np.testing.assert_allclose(plug[site]["out"], want, rtol=1e-3, atol=1e-4, err_msg=site)
    # LoRA on c_fc: its input is ln_2's output, its output the MLP's units
    plug = bridge.fit_plug(gpt2_pair["slm"], gpt2_pair["llm"], batches, ["c_fc"], ridge=0.0)
    xs, xl = [], []
    for b in batches:
        a_s = activations(*gpt2_pair["slm"], b, ["ln_2"])
        a_l = activations(*gpt2_pair["llm"], b, ["ln_2"])
        for j, i in enumerate(bridge.depth_map(2, 3)):
            xs.append(a_s[(i, "ln_2")])
            xl.append(a_l[(j, "ln_2")])
    want = np.linalg.lstsq(np.concatenate(xl), np.concatenate(xs), rcond=None)[0]
    np.testing.assert_allclose(plug["c_fc"]["in"], want, rtol=1e-3, atol=1e-4)
    assert plug["c_fc"]["out"].shape == (24, 40)


def _gpt2_slm_peft(pair, method):
    import jax

    from pifi_jax.hub.pretrained import _flatten
    from pifi_jax.peft import AdapterConfig, LoraConfig, PrefixTuningConfig

    if method == "prefix":
        cfg = PrefixTuningConfig(num_virtual_tokens=3)
    elif method == "lora":
        cfg = LoraConfig(r=2, lora_alpha=4.0, target_modules=SITES["lora"], init_lora_weights=False)
    else:
        cfg = AdapterConfig(kind="houlsby", bottleneck_size=3, train_layernorms=False)
    _, params = pifi_jax.peft.wrap(*pair["slm"], cfg, seed=3)
    flat = _flatten(params)
    keys = jax.random.split(jax.random.key(4), len(flat))
    for key, path in zip(keys, sorted(flat), strict=True):
        if "/adapter_" in path:  # up starts at zero, biases too: random values everywhere
            flat[path] = 0.3 * jax.random.normal(key, flat[path].shape)
    return cfg, flat


def _torch_gpt2_by_hand(llm_dir, method, slm_flat, plug):
    """transformers' GPT-2 LLM with the carried modules applied by hand: LoRA merged into the
    Conv1D weights ([in, out]), adapters by forward hooks, a prefix through Hugging Face PEFT."""
    mapping = bridge.depth_map(2, 3)
    model = transformers.GPT2LMHeadModel.from_pretrained(llm_dir).eval()
    if method == "prefix":
        import peft as hf_peft

        table = np.asarray(slm_flat["prefix_encoder/embedding"]).reshape(3, 2, 2, -1)
        columns = []
        for i in mapping:
            columns += [table[:, i, 0] @ plug["c_attn.key"]["out"]]
            columns += [table[:, i, 1] @ plug["c_attn.value"]["out"]]
        config = hf_peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
        model = hf_peft.get_peft_model(model, config).eval()
        with torch.no_grad():
            weight = model.prompt_encoder["default"].embedding.weight
            weight.copy_(torch.tensor(np.concatenate(columns, axis=1)))
        return model
    for j, i in enumerate(mapping):
        block = model.transformer.h[j]
        for site, module, host in (
            ("c_attn", block.attn.c_attn, "attn/c_attn"),
            ("c_fc", block.mlp.c_fc, "mlp/c_fc"),
            ("attn.c_proj", block.attn.c_proj, "attn"),
            ("mlp.c_proj", block.mlp.c_proj, "mlp"),
        ):
            if site not in SITES[method]:
                continue
            p_in, p_out = plug[site]["in"], plug[site]["out"]
            at = f"transformer/h_{i}/{host}"
            if method == "lora":
                a, b = np.asarray(slm_flat[f"{at}/lora_a"]), np.asarray(slm_flat[f"{at}/lora_b"])
                with torch.no_grad():
                    module.weight += torch.tensor(2.0 * p_in @ a @ b @ p_out)
                continue
            w = {
                "down": torch.tensor(p_in @ np.asarray(slm_flat[f"{at}/adapter_down/kernel"])),
                "d": torch.tensor(np.asarray(slm_flat[f"{at}/adapter_down/bias"])),
                "up": torch.tensor(np.asarray(slm_flat[f"{at}/adapter_up/kernel"]) @ p_out),
                "u": torch.tensor(np.asarray(slm_flat[f"{at}/adapter_up/bias"]) @ p_out),
            }

            def hook(mod, args, out, w=w):
                return out + torch.relu(out @ w["down"] + w["d"]) @ w["up"] + w["u"]

            module.register_forward_hook(hook)
    return model


@pytest.mark.parametrize("method", ["lora", "adapter", "prefix"])
def test_gpt2_plugged_modules_equal_the_modules_applied_by_hand(gpt2_pair, method):
    from pifi_jax.hub.pretrained import _flatten, _unflatten

    cfg, slm_flat = _gpt2_slm_peft(gpt2_pair, method)
    modules = bridge.slm_modules(slm_flat, method, SITES[method], 2)
    plug = bridge.fit_plug(
        gpt2_pair["slm"], gpt2_pair["llm"], make_batches(5), SITES[method], method=method
    )
    leaves = bridge.plug_modules(modules, plug, 3)
    llm_peft, llm_params = pifi_jax.peft.wrap(*gpt2_pair["llm"], cfg, seed=0)
    flat = _flatten(llm_params)
    assert set(leaves) == {p for p in flat if "lora_" in p or "adapter_" in p or "prefix_" in p}
    flat.update(leaves)
    batch = make_batches(6)[0]
    got = _logits(llm_peft, _unflatten(flat), batch)
    want = _torch_logits(_torch_gpt2_by_hand(gpt2_pair["llm_dir"], method, slm_flat, plug), batch)
    real = batch["attention_mask"] > 0
    np.testing.assert_allclose(got[real], want[real], atol=3e-5)
    assert np.abs(want - _logits(*gpt2_pair["llm"], batch))[real].max() > 1e-3

    # through the bridge: at r = 1 the bridge with the initial transfer is the plugged LLM; at
    # r = 4 its leaves take the kept columns of c_attn's three parts and of c_fc
    for r in (1, 4):
        selection = bridge.select(gpt2_pair["scores"], gpt2_pair["llm"][0].config, r)
        small = bridge.prune(str(gpt2_pair["llm_dir"]), selection, log=lambda s: None)
        peft_bridge, bridge_params = pifi_jax.peft.wrap(*small, cfg, seed=0)
        trainable = bridge.init_transfer(modules, plug, selection, gpt2_pair["llm"][0].config)
        b_leaves = bridge.bridge_leaves(trainable, selection, gpt2_pair["llm"][0].config)
        on_bridge = _logits(
            peft_bridge, bridge.adapt.with_leaves(_flatten(bridge_params), b_leaves), batch
        )
        if r == 1:
            np.testing.assert_allclose(on_bridge[real], got[real], atol=3e-5)
        else:
            plain = _logits(peft_bridge, bridge_params, batch)
            assert np.abs(on_bridge - plain)[real].max() > 1e-3
    if method == "lora":  # the kept columns of the fused c_attn: q | k | v, each part's heads
        from pifi_jax.bridge.adapt import kept_columns

        cols = kept_columns(selection, gpt2_pair["llm"][0].config, "c_attn", 0)
        heads = selection.q_heads[0]
        each = (heads[:, None] * HD + np.arange(HD)).ravel()
        np.testing.assert_array_equal(cols, np.concatenate([each, 48 + each, 96 + each]))
