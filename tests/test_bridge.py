"""Bridge transfer, stages 2-3: depth mapping, Fisher importance, the pruned bridge model.

References: the empirical Fisher from transformers' PyTorch models (one backward per example,
squared gradients summed), the selection rule transcribed in NumPy from shared/spec/bridge.md
and the choices of pifi_jax/bridge/prune.py's docstring, the dense LLM with the dropped weights
zeroed, and transformers loading the saved bridge.
"""

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import pifi_jax
from pifi_jax import bridge
from pifi_jax.hub.pretrained import _flatten, _unflatten

VOCAB = 61


def write_llm(directory, *, family="qwen2", tied=False, seed=0, heads=8, kv=2, layers=3):
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        pad_token_id=0,
        rms_norm_eps=1e-5,
    )
    if family == "llama":
        config = transformers.LlamaConfig(**common, attention_bias=True, mlp_bias=True)
        model = transformers.LlamaForCausalLM(config)
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    with torch.no_grad():  # non-trivial norm weights and biases, so that each is tested
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("bias"):
                p.copy_(
                    1.0 + 0.3 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p)
                )
    model.save_pretrained(directory)
    return model


def make_batches(seed=0, rows=(3, 2), length=9):
    rng = np.random.default_rng(seed)
    out = []
    for n in rows:
        ids = rng.integers(1, VOCAB, size=(n, length)).astype(np.int32)
        mask = np.ones((n, length), np.int32)
        loss = np.zeros((n, length), np.int32)
        for r in range(n):
            real = int(rng.integers(5, length + 1))
            mask[r, real:] = 0
            ids[r, real:] = 0
            loss[r, real - 3 : real] = 1  # the last three real tokens are the target
        ids[0, 1] = ids[0, 4]  # a repeated token: its embedding row gets two contributions
        out.append({"input_ids": ids, "attention_mask": mask, "loss_mask": loss})
    return out


def torch_fisher(model, batches) -> tuple[dict[str, np.ndarray], int]:
    """Per-example squared gradients of -log p(targets), averaged: torch names -> [out, in]."""
    acc = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    count = 0
    for b in batches:
        for e in range(b["input_ids"].shape[0]):
            ids = torch.tensor(b["input_ids"][e : e + 1], dtype=torch.long)
            mask = torch.tensor(b["attention_mask"][e : e + 1])
            target = torch.tensor(b["loss_mask"][e, 1:], dtype=torch.float64)
            model.zero_grad()
            logits = model(input_ids=ids, attention_mask=mask).logits[0, :-1].double()
            logp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
            (-(logp * target).sum()).backward()
            for n, p in model.named_parameters():
                acc[n] += p.grad.detach() ** 2
            count += int(target.sum() > 0)
    return {n: (v / count).numpy() for n, v in acc.items()}, count


def numpy_scores(h: dict[str, np.ndarray], cfg) -> dict:
    """The spec's importance aggregates, in torch's [out, in] layout."""
    layers, hd = cfg.num_hidden_layers, cfg.head_dim
    hidden = h["model.embed_tokens.weight"].sum(0) + h["model.norm.weight"]
    if "lm_head.weight" in h:
        hidden = hidden + h["lm_head.weight"].sum(0)
    q = np.zeros((layers, cfg.num_attention_heads))
    kv = np.zeros((layers, cfg.num_key_value_heads))
    ffn = np.zeros((layers, cfg.intermediate_size))
    for i in range(layers):
        p = f"model.layers.{i}."

        def get(name, p=p):
            return h.get(p + name, None)

        hidden = hidden + get("input_layernorm.weight") + get("post_attention_layernorm.weight")
        for name in ("q_proj", "k_proj", "v_proj"):
            w = get(f"self_attn.{name}.weight")
            hidden = hidden + w.sum(0)
            per_head = w.reshape(-1, hd, w.shape[1]).sum((1, 2))
            bias = get(f"self_attn.{name}.bias")
            if bias is not None:
                per_head = per_head + bias.reshape(-1, hd).sum(1)
            if name == "q_proj":
                q[i] += per_head
            else:
                kv[i] += per_head
        o = get("self_attn.o_proj.weight")
        hidden = hidden + o.sum(1)
        q[i] += o.reshape(o.shape[0], -1, hd).sum((0, 2))
        for name in ("gate_proj", "up_proj"):
            w = get(f"mlp.{name}.weight")
            hidden = hidden + w.sum(0)
            ffn[i] += w.sum(1) + (
                get(f"mlp.{name}.bias") if get(f"mlp.{name}.bias") is not None else 0
            )
        down = get("mlp.down_proj.weight")
        hidden = hidden + down.sum(1)
        ffn[i] += down.sum(0)
        for name in ("self_attn.o_proj.bias", "mlp.down_proj.bias"):
            if get(name) is not None:
                hidden = hidden + get(name)
    return {"hidden": hidden, "q": q, "kv": kv, "ffn": ffn}


def numpy_selection(s: dict, cfg, r: float) -> dict:
    f = np.sqrt(r)
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    n_kv = max(1, round(cfg.num_key_value_heads / f))
    per = min(group, max(1, round(cfg.num_attention_heads / f / n_kv)))

    def top(x, k):  # brute force: sort by (-score, index)
        return sorted(sorted(range(len(x)), key=lambda j: (-x[j], j))[:k])

    out = {
        "hidden": top(s["hidden"], max(1, round(cfg.hidden_size / f))),
        "kv": [],
        "q": [],
        "ffn": [],
    }
    for i in range(cfg.num_hidden_layers):
        g_score = [
            s["kv"][i][g] + sum(s["q"][i][g * group : (g + 1) * group])
            for g in range(cfg.num_key_value_heads)
        ]
        groups = top(g_score, n_kv)
        out["kv"].append(groups)
        out["q"].append(
            [
                g * group + j
                for g in groups
                for j in top(s["q"][i][g * group : (g + 1) * group], per)
            ]
        )
        out["ffn"].append(top(s["ffn"][i], max(1, round(cfg.intermediate_size / f))))
    return out


# Default: a tied Qwen2 (q/k/v biases; tied like SmolLM2 and Qwen2.5's small models); with -m slow
# also an untied Llama with biases on o, down and the MLP.
@pytest.fixture(
    scope="module", params=["qwen2-tied", pytest.param("llama-untied", marks=pytest.mark.slow)]
)
def llm(request, tmp_path_factory):
    family, tied = ("llama", False) if request.param == "llama-untied" else ("qwen2", True)
    directory = tmp_path_factory.mktemp(request.param)
    model = write_llm(directory, family=family, tied=tied)
    batches = make_batches()
    scores = bridge.fisher_scores(str(directory), batches, keep_full=True, log=lambda s: None)
    return {"dir": directory, "model": model, "batches": batches, "scores": scores}


def test_fisher_matches_torch_per_example_gradients(llm):
    reference, count = torch_fisher(llm["model"], llm["batches"])
    scores = llm["scores"]
    assert scores.examples == count == 5
    flat = scores.full
    for name, h in reference.items():
        if name == "lm_head.weight" and "lm_head/kernel" not in flat:
            continue  # tied: the embedding holds both uses
        path = (
            name.replace("model.layers.", "model/layers_")
            .replace(".", "/")
            .replace("/weight", "/kernel")
            .replace("embed_tokens/kernel", "embed_tokens/embedding")
        )
        if "norm/kernel" in path:
            path = path.replace("norm/kernel", "norm/scale")
        ours = flat[path]
        if path.endswith("/kernel"):
            ours = ours.T
        np.testing.assert_allclose(ours, h, rtol=2e-4, atol=1e-6 * np.abs(h).max(), err_msg=name)


def test_selection_keeps_the_brute_force_top_rows_and_columns(llm):
    reference, _ = torch_fisher(llm["model"], llm["batches"])
    cfg = llm["model"].config
    ref_scores = numpy_scores(reference, cfg)
    scores = llm["scores"]
    np.testing.assert_allclose(scores.hidden, ref_scores["hidden"], rtol=2e-4)
    np.testing.assert_allclose(scores.q_heads, ref_scores["q"], rtol=2e-4)
    np.testing.assert_allclose(scores.kv_groups, ref_scores["kv"], rtol=2e-4)
    np.testing.assert_allclose(scores.ffn, ref_scores["ffn"], rtol=2e-4)
    config = pifi_jax.from_pretrained(str(llm["dir"]), task="causal_lm", log=lambda s: None)[
        0
    ].config
    for r in (4, 16, 64):
        want = numpy_selection(ref_scores, cfg, r)
        got = bridge.select(scores, config, r)
        assert got.hidden.tolist() == want["hidden"], r
        assert [g.tolist() for g in got.kv_groups] == want["kv"], r
        assert [q.tolist() for q in got.q_heads] == want["q"], r
        assert [u.tolist() for u in got.ffn] == want["ffn"], r


def _torch_logits(model, batch) -> np.ndarray:
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
            attention_mask=torch.tensor(batch["attention_mask"]),
        ).logits.numpy()


def _logits(module, params, batch):
    return np.asarray(module.apply({"params": params}, batch["input_ids"], batch["attention_mask"]))


def test_reduction_one_is_the_llm(llm):
    module, params = pifi_jax.from_pretrained(str(llm["dir"]), task="causal_lm", log=lambda s: None)
    selection = bridge.select(llm["scores"], module.config, 1)
    small, small_params = bridge.prune(str(llm["dir"]), selection, log=lambda s: None)
    assert small.config == module.config
    batch = llm["batches"][0]
    np.testing.assert_allclose(
        _logits(small, small_params, batch), _logits(module, params, batch), atol=1e-5
    )


def _zeroed(params: dict, config, sel) -> dict:
    """The dense LLM with every dropped dimension, head and unit zeroed."""
    flat = {p: np.array(v) for p, v in _flatten(params).items()}
    drop_h = np.setdiff1d(np.arange(config.hidden_size), sel.hidden)
    hd = config.head_dim
    flat["model/embed_tokens/embedding"][:, drop_h] = 0
    for i in range(config.num_hidden_layers):
        p = f"model/layers_{i}/"
        q_keep = (sel.q_heads[i][:, None] * hd + np.arange(hd)).ravel()
        kv_keep = (sel.kv_groups[i][:, None] * hd + np.arange(hd)).ravel()
        for name, keep in (("q_proj", q_keep), ("k_proj", kv_keep), ("v_proj", kv_keep)):
            w = flat[p + f"self_attn/{name}/kernel"]
            w[:, np.setdiff1d(np.arange(w.shape[1]), keep)] = 0
            if p + f"self_attn/{name}/bias" in flat:
                b = flat[p + f"self_attn/{name}/bias"]
                b[np.setdiff1d(np.arange(b.shape[0]), keep)] = 0
        o = flat[p + "self_attn/o_proj/kernel"]
        o[np.setdiff1d(np.arange(o.shape[0]), q_keep)] = 0
        o[:, drop_h] = 0
        drop_u = np.setdiff1d(np.arange(config.intermediate_size), sel.ffn[i])
        for name in ("gate_proj", "up_proj"):
            flat[p + f"mlp/{name}/kernel"][:, drop_u] = 0
            if p + f"mlp/{name}/bias" in flat:
                flat[p + f"mlp/{name}/bias"][drop_u] = 0
        flat[p + "mlp/down_proj/kernel"][drop_u] = 0
        flat[p + "mlp/down_proj/kernel"][:, drop_h] = 0
        for name in ("self_attn/o_proj/bias", "mlp/down_proj/bias"):
            if p + name in flat:
                flat[p + name][drop_h] = 0
    return _unflatten({k: jnp.asarray(v) for k, v in flat.items()})


@pytest.mark.parametrize("r", [4, 16])
def test_bridge_is_the_dense_llm_with_the_dropped_dimensions_zeroed(llm, r):
    module, params = pifi_jax.from_pretrained(str(llm["dir"]), task="causal_lm", log=lambda s: None)
    selection = bridge.select(llm["scores"], module.config, r)
    small, small_params = bridge.prune(str(llm["dir"]), selection, log=lambda s: None)
    sizes = bridge.bridge_sizes(module.config, r)
    assert small.config.hidden_size == sizes.hidden < module.config.hidden_size
    assert small.config.num_attention_heads == sizes.heads < module.config.num_attention_heads
    dense = _zeroed(params, module.config, selection)
    for batch in llm["batches"]:
        want = _logits(module, dense, batch)
        got = _logits(small, small_params, batch)
        real = batch["attention_mask"] > 0
        np.testing.assert_allclose(got[real], want[real], atol=2e-5, rtol=1e-5)
    # and the identity is not trivial: the unpruned LLM computes something else
    full = _logits(module, params, llm["batches"][0])
    assert np.abs(full - _logits(small, small_params, llm["batches"][0])).max() > 1e-2


def test_saved_bridge_loads_in_pifi_jax_and_transformers(llm, tmp_path):
    module, _ = pifi_jax.from_pretrained(str(llm["dir"]), task="causal_lm", log=lambda s: None)
    selection = bridge.select(llm["scores"], module.config, 16)
    small, small_params = bridge.prune(str(llm["dir"]), selection, log=lambda s: None)
    out = bridge.save_bridge(
        small,
        small_params,
        tmp_path / "bridge",
        llm=str(llm["dir"]),
        selection=selection,
        reduction=16,
        scores=llm["scores"],
    )
    loaded, loaded_params = pifi_jax.from_pretrained(str(out), task="causal_lm", log=lambda s: None)
    batch = llm["batches"][1]
    ours = _logits(small, small_params, batch)
    np.testing.assert_array_equal(_logits(loaded, loaded_params, batch), ours)
    theirs = _torch_logits(transformers.AutoModelForCausalLM.from_pretrained(out), batch)
    real = batch["attention_mask"] > 0
    np.testing.assert_allclose(theirs[real], ours[real], atol=3e-5)
    record = __import__("json").loads((out / "bridge.json").read_text())
    assert (
        bridge.Selection.from_json(record["selection"]).hidden.tolist() == selection.hidden.tolist()
    )
    assert record["reduction"] == 16 and record["fisher_examples"] == 5


def test_fisher_scores_file_round_trip_and_garbage_refused(llm, tmp_path):
    path = llm["scores"].save(tmp_path / "fisher.npz")
    back = bridge.FisherScores.load(path)
    np.testing.assert_array_equal(back.hidden, llm["scores"].hidden)
    np.testing.assert_array_equal(back.ffn, llm["scores"].ffn)
    assert back.examples == 5
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.npz: not a Fisher score file"):
        bridge.FisherScores.load(tmp_path / "bad.npz")


def test_depth_map_matches_real_number_bounds():
    for slm, llm in [(24, 28), (12, 48), (6, 6), (4, 30), (30, 4), (1, 5)]:
        mapping = bridge.depth_map(slm, llm)
        assert len(mapping) == llm
        for j, i in enumerate(mapping):
            # SLM layer i serves [i * L / Ls, (i + 1) * L / Ls)
            assert Fraction(i * llm, slm) <= j < Fraction((i + 1) * llm, slm)
        assert mapping == sorted(mapping)
    assert bridge.served_layers(2, 5) == {0: [0, 1, 2], 1: [3, 4]}
    with pytest.raises(ValueError, match="at least one layer"):
        bridge.depth_map(0, 4)


def test_depth_map_file(tmp_path):
    path = bridge.write_depth_map(tmp_path / "depth.json", 24, 28)
    record = __import__("json").loads(path.read_text())
    assert record["llm_to_slm"] == bridge.depth_map(24, 28)
    assert sum(len(v) for v in record["slm_to_llm"].values()) == 28


def test_tokenizer_pairs_refused_with_the_difference(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from tests.conftest import tiny_word_tokenizer

    a = tiny_word_tokenizer(tmp_path / "a", bos=True)
    same = tiny_word_tokenizer(tmp_path / "same", bos=True)
    bridge.check_same_tokenizer(a, same, "slm", "llm")  # the same tokenizer passes
    no_bos = tiny_word_tokenizer(tmp_path / "b", bos=False)
    with pytest.raises(ValueError, match="same vocabulary but encode a probe text differently"):
        bridge.check_same_tokenizer(a, no_bos, "slm-dir", "llm-dir")
    vocab = dict(a.get_vocab())
    vocab["zebra"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    with pytest.raises(
        ValueError, match=r"my-slm .* and my-llm .* differ: .*only in the LLM's \['zebra'\]"
    ):
        bridge.check_same_tokenizer(a, other, "my-slm", "my-llm")


def test_other_families_and_bad_reductions_refused(tmp_path, llm):
    from tests.conftest import write_tiny_decoder

    falcon = write_tiny_decoder(tmp_path / "falcon", "falcon")
    with pytest.raises(ValueError, match="supports the model types .*gpt2.*'falcon'"):
        bridge.fisher_scores(str(falcon), llm["batches"], log=lambda s: None)
    config = pifi_jax.from_pretrained(str(llm["dir"]), task="causal_lm", log=lambda s: None)[
        0
    ].config
    with pytest.raises(ValueError, match="reduction must be >= 1"):
        bridge.bridge_sizes(config, 0.5)
    empty = [dict(b, loss_mask=np.zeros_like(b["loss_mask"])) for b in llm["batches"]]
    with pytest.raises(ValueError, match="no example has a target token"):
        bridge.fisher_scores(str(llm["dir"]), empty, log=lambda s: None)


# --- W_plug and plugging LoRA modules into the LLM (stage 2 / 5) ---------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    slm_dir = tmp_path_factory.mktemp("slm")
    llm_dir = tmp_path_factory.mktemp("llm")
    torch.manual_seed(1)
    small = transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=4,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    transformers.Qwen2ForCausalLM(small).save_pretrained(slm_dir)
    write_llm(llm_dir, family="qwen2", seed=2)
    quiet = dict(log=lambda s: None)
    return {
        "slm": pifi_jax.from_pretrained(str(slm_dir), task="causal_lm", **quiet),
        "llm": pifi_jax.from_pretrained(str(llm_dir), task="causal_lm", **quiet),
        "llm_dir": llm_dir,
    }


TARGETS = ("q_proj", "v_proj", "up_proj")
SITES = {"lora": TARGETS, "adapter": ("o_proj", "down_proj"), "prefix": ("k_proj", "v_proj")}


def test_plug_fitted_between_a_model_and_itself_is_the_identity(pair):
    llm = pair["llm"]
    for method, sites in SITES.items():
        plug = bridge.fit_plug(
            llm, llm, make_batches(3, rows=(4, 4)), sites, method=method, ridge=1e-9
        )
        assert set(plug) == set(sites)
        for t in sites:
            assert set(plug[t]) == ({"out"} if method == "prefix" else {"in", "out"})
            for m in plug[t].values():
                np.testing.assert_allclose(m, np.eye(m.shape[0]), atol=1e-4)


def _lstsq_maps(pair, batches, x_name, y_name):
    """An independent pooling of the two models' activations, solved by numpy's lstsq."""
    from pifi_jax.bridge.plug import activations

    slm, llm = pair["slm"], pair["llm"]
    mapping = bridge.depth_map(2, 3)
    xs, xl, ys, yl = [], [], [], []
    for b in batches:
        a_s = activations(*slm, b, (x_name, y_name))
        a_l = activations(*llm, b, (x_name, y_name))
        for j in range(3):
            xs.append(a_s[(mapping[j], x_name)])
            xl.append(a_l[(j, x_name)])
            ys.append(a_s[(mapping[j], y_name)])
            yl.append(a_l[(j, y_name)])
    want_in = np.linalg.lstsq(np.concatenate(xl), np.concatenate(xs), rcond=None)[0]
    want_out = np.linalg.lstsq(np.concatenate(ys), np.concatenate(yl), rcond=None)[0]
    return want_in, want_out


def test_plug_is_the_least_squares_map_between_the_two_models_activations(pair):
    slm, llm = pair["slm"], pair["llm"]
    batches = make_batches(4, rows=(4, 4))
    plug = bridge.fit_plug(slm, llm, batches, TARGETS, ridge=0.0)
    assert plug["q_proj"]["in"].shape == (32, 16) and plug["q_proj"]["out"].shape == (16, 64)
    assert plug["v_proj"]["out"].shape == (8, 16) and plug["up_proj"]["out"].shape == (24, 48)
    want_in, want_out = _lstsq_maps(pair, batches, "post_attention_layernorm", "mlp/up_proj")
    np.testing.assert_allclose(plug["up_proj"]["in"], want_in, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(plug["up_proj"]["out"], want_out, rtol=1e-3, atol=1e-4)
    # an adapter after o_proj maps the LLM's attention output to the SLM's and back
    plug = bridge.fit_plug(slm, llm, batches, ("o_proj",), method="adapter", ridge=0.0)
    assert plug["o_proj"]["in"].shape == (32, 16) and plug["o_proj"]["out"].shape == (16, 32)
    want_in, want_out = _lstsq_maps(pair, batches, "self_attn/o_proj", "self_attn/o_proj")
    np.testing.assert_allclose(plug["o_proj"]["in"], want_in, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(plug["o_proj"]["out"], want_out, rtol=1e-3, atol=1e-4)


def _slm_peft(pair, method):
    """(PEFT config, the SLM's PEFT params) with every module leaf away from zero."""
    import jax

    from pifi_jax.peft import AdapterConfig, LoraConfig, PrefixTuningConfig

    if method == "prefix":  # the table starts N(0, 1)
        cfg = PrefixTuningConfig(num_virtual_tokens=3)
        return cfg, pifi_jax.peft.wrap(*pair["slm"], cfg, seed=3)[1]
    if method == "lora":
        cfg = LoraConfig(r=2, lora_alpha=4.0, target_modules=TARGETS, init_lora_weights=False)
        return cfg, pifi_jax.peft.wrap(*pair["slm"], cfg, seed=3)[1]
    cfg = AdapterConfig(kind="houlsby", bottleneck_size=3, train_layernorms=False)
    _, params = pifi_jax.peft.wrap(*pair["slm"], cfg, seed=3)
    flat = _flatten(params)
    keys = jax.random.split(jax.random.key(4), len(flat))
    for key, path in zip(keys, sorted(flat), strict=True):
        if "/adapter_" in path:  # up starts at zero, biases too: random values everywhere
            flat[path] = 0.3 * jax.random.normal(key, flat[path].shape)
    return cfg, _unflatten(flat)


def _adapter_hooks(model, slm_flat, plug, llm_layers, slm_layers):
    """Forward hooks on a transformers LLM adding relu(h P_in D + d) U P_out + u P_out after
    o_proj and down_proj: the carried adapters, applied by hand in torch."""
    handles = []
    for j, i in enumerate(bridge.depth_map(slm_layers, llm_layers)):
        layer = model.model.layers[j]
        for site, host, mod in (
            ("o_proj", "self_attn", layer.self_attn.o_proj),
            ("down_proj", "mlp", layer.mlp.down_proj),
        ):
            leaf = {
                k: np.asarray(slm_flat[f"model/layers_{i}/{host}/adapter_{k}"])
                for k in ("down/kernel", "down/bias", "up/kernel", "up/bias")
            }
            p_in, p_out = plug[site]["in"], plug[site]["out"]
            w = {
                "down": torch.tensor(p_in @ leaf["down/kernel"]),
                "d": torch.tensor(leaf["down/bias"]),
                "up": torch.tensor(leaf["up/kernel"] @ p_out),
                "u": torch.tensor(leaf["up/bias"] @ p_out),
            }

            def hook(module, args, out, w=w):
                return out + torch.relu(out @ w["down"] + w["d"]) @ w["up"] + w["u"]

            handles.append(mod.register_forward_hook(hook))
    return handles


def _hf_prefix_logits(llm_dir, table: np.ndarray, batch) -> np.ndarray:
    """transformers' LLM under Hugging Face PEFT's prefix tuning, its table set to `table`."""
    import peft as hf_peft

    base = transformers.AutoModelForCausalLM.from_pretrained(llm_dir)
    config = hf_peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=table.shape[0])
    model = hf_peft.get_peft_model(base, config).eval()
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.copy_(torch.tensor(table))
    return _torch_logits(model, batch)


@pytest.mark.parametrize("method", ["lora", "adapter", "prefix"])
def test_plugged_modules_on_the_llm_equal_the_modules_applied_by_hand(pair, method):
    slm, llm = pair["slm"], pair["llm"]
    cfg, slm_params = _slm_peft(pair, method)
    slm_flat = _flatten(slm_params)
    modules = bridge.slm_modules(slm_flat, method, SITES[method], 2)
    plug = bridge.fit_plug(slm, llm, make_batches(5), SITES[method], method=method)
    leaves = bridge.plug_modules(modules, plug, 3)
    llm_peft, llm_params = pifi_jax.peft.wrap(*llm, cfg, seed=0)
    flat = _flatten(llm_params)
    assert set(leaves) == {p for p in flat if "lora_" in p or "adapter_" in p or "prefix_" in p}
    flat.update(leaves)
    plugged = _unflatten(flat)
    batch = make_batches(6)[0]
    got = _logits(llm_peft, plugged, batch)
    if method == "lora":
        # by hand: W + (alpha / r) * P_in A B P_out in every LLM layer, A B of SLM layer
        # depth_map(j)
        dense = {p: np.array(v) for p, v in _flatten(llm[1]).items()}
        for j, i in enumerate(bridge.depth_map(2, 3)):
            for t in TARGETS:
                block = "mlp" if t == "up_proj" else "self_attn"
                a = np.asarray(slm_flat[f"model/layers_{i}/{block}/{t}/lora_a"])
                b = np.asarray(slm_flat[f"model/layers_{i}/{block}/{t}/lora_b"])
                delta = plug[t]["in"] @ a @ b @ plug[t]["out"]
                dense[f"model/layers_{j}/{block}/{t}/kernel"] += 2.0 * delta
        want = _logits(llm[0], _unflatten({k: jnp.asarray(v) for k, v in dense.items()}), batch)
    elif method == "prefix":
        # by hand: layer j's keys K_i P_out(k_proj), values V_i P_out(v_proj), i = depth_map(j),
        # in Hugging Face PEFT's table layout, on transformers' LLM
        table = np.asarray(slm_flat["prefix_encoder/embedding"])  # [P, 2 layers * 2 * W_s]
        blocks = table.reshape(3, 2, 2, -1)  # [P, layer, key / value, W_s]
        columns = []
        for i in bridge.depth_map(2, 3):
            columns += [
                blocks[:, i, 0] @ plug["k_proj"]["out"],
                blocks[:, i, 1] @ plug["v_proj"]["out"],
            ]
        want = _hf_prefix_logits(pair["llm_dir"], np.concatenate(columns, axis=1), batch)
    else:
        # by hand: transformers' LLM with the carried adapters added by forward hooks
        model = transformers.AutoModelForCausalLM.from_pretrained(pair["llm_dir"]).eval()
        handles = _adapter_hooks(model, slm_flat, plug, 3, 2)
        want = _torch_logits(model, batch)
        for h in handles:
            h.remove()
    real = batch["attention_mask"] > 0
    np.testing.assert_allclose(got[real], want[real], atol=3e-5)
    assert np.abs(want - _logits(*llm, batch))[real].max() > 1e-3  # the modules change the LLM


def test_unsupported_targets_and_methods_are_refused():
    with pytest.raises(ValueError, match=r"supports the targets .* got \['o_proj'\]"):
        bridge.plug.check_sites("lora", ["o_proj"])
    with pytest.raises(ValueError, match=r"adapters supports the sites .* got \['q_proj'\]"):
        bridge.plug.check_sites("adapter", ["q_proj"])
    with pytest.raises(
        ValueError, match=r"carries \('lora', 'adapter', 'prefix'\) modules, got .*'ia3'"
    ):
        bridge.plug.check_sites("ia3", ["q_proj"])
    with pytest.raises(ValueError, match=r"lack model/layers_0/self_attn/adapter_down/kernel"):
        bridge.slm_modules({}, "adapter", ["o_proj"], 2)
    with pytest.raises(ValueError, match=r"a prefix has the sites .* got \['k_proj'\]"):
        bridge.plug.check_sites("prefix", ["k_proj"])
    with pytest.raises(ValueError, match="a prefix_projection MLP does not carry over"):
        bridge.slm_modules(
            {"prefix_encoder/transform_0/kernel": 0}, "prefix", ["k_proj", "v_proj"], 2
        )


# --- stage 4: adapting through the bridge ----------------------------------------------------


@pytest.fixture(scope="module")
def fisher_batches(pair):
    batches = make_batches(7)
    scores = bridge.fisher_scores(str(pair["llm_dir"]), batches, log=lambda s: None)
    return {"scores": scores, "batches": batches}


@pytest.fixture(scope="module", params=["lora", "adapter", "prefix"])
def transfer(pair, fisher_batches, request):
    method = request.param
    slm, llm = pair["slm"], pair["llm"]
    cfg, slm_params = _slm_peft(pair, method)
    modules = bridge.slm_modules(_flatten(slm_params), method, SITES[method], 2)
    plug = bridge.fit_plug(slm, llm, make_batches(5), SITES[method], method=method)
    return {"method": method, "peft": cfg, "modules": modules, "plug": plug, **fisher_batches}


def _bridge_run(pair, transfer, r):
    llm_module, _ = pair["llm"]
    selection = bridge.select(transfer["scores"], llm_module.config, r)
    small = bridge.prune(str(pair["llm_dir"]), selection, log=lambda s: None)
    peft_bridge, peft_params = pifi_jax.peft.wrap(*small, transfer["peft"], seed=0)
    trainable = bridge.init_transfer(
        transfer["modules"], transfer["plug"], selection, llm_module.config
    )
    return selection, peft_bridge, _flatten(peft_params), trainable


def restricted(leaves: dict, selection, width: int) -> dict:
    """The LLM's adapter leaves with their writes to the dropped residual dimensions removed
    (the zeroed LLM keeps those dimensions at zero, as the bridge, which lacks them, does)."""
    drop = np.setdiff1d(np.arange(width), selection.hidden)
    out = {}
    for path, value in leaves.items():
        value = np.array(value)
        if path.endswith("adapter_up/kernel"):
            value[:, drop] = 0
        elif path.endswith("adapter_up/bias"):
            value[drop] = 0
        out[path] = jnp.asarray(value)
    return out


@pytest.mark.parametrize("r", [1, 16])
def test_bridge_starts_as_the_zeroed_llm_with_the_plugged_modules(pair, transfer, r):
    llm_module, llm_params = pair["llm"]
    selection, peft_bridge, frozen, trainable = _bridge_run(pair, transfer, r)
    if transfer["method"] == "prefix":  # no residual-stream side, no W_down
        assert "down" not in trainable
    else:
        assert trainable["down"].shape == (len(selection.hidden), 32)
    bridge_params = bridge.adapt.with_leaves(
        frozen, bridge.bridge_leaves(trainable, selection, llm_module.config)
    )
    dense = _zeroed(llm_params, llm_module.config, selection) if r > 1 else llm_params
    peft_llm, peft_llm_params = pifi_jax.peft.wrap(llm_module, dense, transfer["peft"], seed=0)
    leaves = bridge.llm_leaves(trainable, llm_module.config)
    if transfer["method"] == "adapter":
        leaves = restricted(leaves, selection, llm_module.config.hidden_size)
    llm_params_plugged = bridge.adapt.with_leaves(_flatten(peft_llm_params), leaves)
    for batch in transfer["batches"]:
        real = batch["attention_mask"] > 0
        got = _logits(peft_bridge, bridge_params, batch)[real]
        want = _logits(peft_llm, llm_params_plugged, batch)[real]
        np.testing.assert_allclose(got, want, atol=3e-5, rtol=1e-5)
    # and the modules matter: without them the bridge computes something else
    plain = _logits(peft_bridge, _unflatten(frozen), transfer["batches"][0])
    real = transfer["batches"][0]["attention_mask"] > 0
    got = _logits(peft_bridge, bridge_params, transfer["batches"][0])
    assert np.abs(plain[real] - got[real]).max() > 1e-3


def assert_differentiates_no_llm_weight(loss, trainable, others, llm_params) -> None:
    """No LLM weight enters the differentiated program of `loss` (of the trainable tree): its
    inputs are exactly the trainable arrays, and no input or constant has the shape of an LLM
    kernel that none of the trainable, frozen-bridge and batch arrays (`others`) has; and every
    trainable leaf gets a gradient."""
    import jax

    jaxpr = jax.make_jaxpr(jax.grad(loss))(trainable)
    inputs = [tuple(v.aval.shape) for v in jaxpr.jaxpr.invars]
    assert inputs == [tuple(np.shape(x)) for x in jax.tree.leaves(trainable)]
    consts = {tuple(np.shape(c)) for c in jaxpr.consts}
    llm_kernels = {
        tuple(np.shape(v)) for p, v in _flatten(llm_params).items() if p.endswith("kernel")
    }
    own = {tuple(np.shape(x)) for x in jax.tree.leaves((trainable, others))}
    assert not ((set(inputs) | consts) & (llm_kernels - own))
    grads = jax.grad(loss)(trainable)
    for path, g in _flatten(grads).items():
        assert np.abs(np.asarray(g)).max() > 0, path


def test_adaptation_trains_modules_plug_and_down_without_the_llm(pair, transfer):
    import jax
    import optax

    llm_module, llm_params = pair["llm"]
    selection, peft_bridge, frozen, trainable = _bridge_run(pair, transfer, 4)
    kw = dict(module=peft_bridge, selection=selection, llm_config=llm_module.config)
    batch = {k: jnp.asarray(v) for k, v in transfer["batches"][0].items()}

    def loss(t):
        return bridge.adapt_loss(t, frozen, batch, **kw)

    assert_differentiates_no_llm_weight(loss, trainable, (frozen, batch), llm_params)
    opt = optax.adam(3e-2)
    state = opt.init(trainable)
    first = float(loss(trainable))
    step = jax.jit(lambda t, s: _step(loss, opt, t, s))
    steps, bound = (40, 0.95) if transfer["method"] == "lora" else (80, 0.97)
    for _ in range(steps):
        trainable, state = step(trainable, state)
    assert float(loss(trainable)) < bound * first  # random targets: it fits them slowly


def _step(loss, opt, t, s):
    import optax

    g = __import__("jax").grad(loss)(t)
    updates, s = opt.update(g, s, t)
    return optax.apply_updates(t, updates), s


def test_plugged_modules_export_as_an_adapter_of_the_llm(pair, transfer, tmp_path):
    llm_module, _ = pair["llm"]
    selection, _, _, trainable = _bridge_run(pair, transfer, 16)
    module, params = bridge.plugged_llm(pair["llm"], transfer["peft"], trainable)
    out = bridge.export_llm_adapter(module, params, tmp_path / "adapter")
    batch = transfer["batches"][1]
    real = batch["attention_mask"] > 0
    ours = _logits(module, params, batch)
    if transfer["method"] in ("lora", "prefix"):  # Hugging Face PEFT loads it onto transformers'
        import peft as hf_peft

        base = transformers.AutoModelForCausalLM.from_pretrained(pair["llm_dir"])
        model = hf_peft.PeftModel.from_pretrained(base, out).eval()
        theirs = _torch_logits(model, batch)
    else:  # no Hugging Face format: pifi_jax's native file, loaded onto a fresh LLM
        fresh, fresh_params = pifi_jax.peft.wrap(*pair["llm"], transfer["peft"], seed=9)
        theirs = _logits(fresh, pifi_jax.peft.load_adapter(fresh, fresh_params, out), batch)
    np.testing.assert_allclose(theirs[real], ours[real], atol=3e-5)
    assert np.abs(ours - _logits(*pair["llm"], batch)).max() > 1e-3


def test_fisher_reads_the_llm_one_layer_at_a_time(llm, monkeypatch):
    """The pass never loads the model whole: layer tensors are read in one block per layer,
    ascending (forward) then descending (backward), and the LM head only after the forward;
    an untied model's embedding is no longer held once a layer is read."""
    _check_layer_reads(llm["dir"], llm["model"], llm["batches"], monkeypatch)


def test_fisher_drops_an_untied_embedding_after_the_lookup(tmp_path, monkeypatch):
    """The untied case of the test above in the default set (its fixture's untied model is
    slow: a torch per-example reference): no vocabulary-sized array is alive while any layer is
    read, in the forward or the backward."""
    model = write_llm(tmp_path, family="llama", tied=False)
    _check_layer_reads(tmp_path, model, make_batches(), monkeypatch)


def _check_layer_reads(directory, model, batches, monkeypatch):
    import re

    from pifi_jax.hub.files import CheckpointReader

    order, vocab_matrices = [], []
    real_get = CheckpointReader.get
    config = model.config
    vocab_shape = (config.vocab_size, config.hidden_size)

    def vocab_arrays():
        return sum(a.shape == vocab_shape for a in jax.live_arrays())

    before = vocab_arrays()  # the test's own models hold some

    def get(self, key):
        m = re.match(r"model\.layers\.(\d+)\.", key)
        order.append(int(m.group(1)) if m else key)
        if m:  # vocabulary-sized arrays alive while a layer is read
            vocab_matrices.append(vocab_arrays() - before)
        return real_get(self, key)

    monkeypatch.setattr(CheckpointReader, "get", get)
    bridge.fisher_scores(str(directory), batches[:1], log=lambda s: None)

    def runs(items):  # consecutive repeats merged
        out = []
        for item in items:
            if not out or item != out[-1]:
                out.append(item)
        return out

    n = config.num_hidden_layers
    head = ["lm_head.weight"] if "lm_head.weight" in order else []
    reads = [x for x in runs(order) if isinstance(x, int) or x == "lm_head.weight"]
    # forward 0..n-1, the LM head (untied), backward n-1..0
    assert reads == runs(list(range(n)) + head + list(reversed(range(n))))
    assert order.index(n - 1) < (order.index("lm_head.weight") if head else len(order))
    tied = bool(config.tie_word_embeddings)
    assert set(vocab_matrices) == {1 if tied else 0}, vocab_matrices  # tied: it is the head
