"""Bridge pruning of an encoder-decoder (T5) LLM: the Fisher pass, block by block.

Reference: the empirical Fisher of transformers' T5ForConditionalGeneration (one backward per
example of -log p(target | source), squared gradients averaged), and the aggregates transcribed
in NumPy from pifi_jax/bridge/fisher_seq2seq.py's docstring.
"""

import numpy as np
import pytest
import torch
import transformers

from pifi_jax.bridge import fisher_seq2seq

VOCAB = 61


def write_t5(directory, *, gated: bool, tied: bool, seed=0):
    torch.manual_seed(seed)
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=3,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu" if gated else "relu", tie_word_embeddings=tied,
        dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    model = transformers.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():  # norm weights away from 1, so that each is tested
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


def make_batches(seed=0, rows=(3, 2), source=9, target=6):
    rng = np.random.default_rng(seed)
    out = []
    for n in rows:
        ids = rng.integers(2, VOCAB, size=(n, source)).astype(np.int32)
        mask = np.ones((n, source), np.int32)
        tgt = rng.integers(2, VOCAB, size=(n, target)).astype(np.int32)
        tmask = np.ones((n, target), np.int32)
        for r in range(n):
            real = int(rng.integers(4, source + 1))
            mask[r, real:], ids[r, real:] = 0, 0
            real_t = int(rng.integers(2, target + 1))
            tmask[r, real_t:], tgt[r, real_t:] = 0, 0
        ids[0, 2] = ids[0, 1]  # a repeated source token
        tgt[0, 0] = ids[0, 0]  # a token both looked up in the source and a target
        out.append(
            {"input_ids": ids, "attention_mask": mask, "target_ids": tgt, "target_mask": tmask}
        )
    return out


def torch_fisher(model, batches):
    acc = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    count = 0
    for b in batches:
        for e in range(b["input_ids"].shape[0]):
            tgt = torch.tensor(b["target_ids"][e : e + 1], dtype=torch.long)
            start = torch.zeros((1, 1), dtype=torch.long)
            model.zero_grad()
            logits = (
                model(
                    input_ids=torch.tensor(b["input_ids"][e : e + 1], dtype=torch.long),
                    attention_mask=torch.tensor(b["attention_mask"][e : e + 1]),
                    decoder_input_ids=torch.cat([start, tgt[:, :-1]], dim=1),
                    decoder_attention_mask=torch.tensor(b["target_mask"][e : e + 1]),
                )
                .logits[0]
                .double()
            )
            m = torch.tensor(b["target_mask"][e], dtype=torch.float64)
            logp = torch.log_softmax(logits, -1).gather(-1, tgt[0, :, None])[:, 0]
            (-(logp * m).sum()).backward()
            for n, p in model.named_parameters():
                acc[n] += p.grad.detach() ** 2
            count += int(m.sum() > 0)
    return {n: (v / count).numpy() for n, v in acc.items()}, count


def _flax_path(name: str) -> tuple[str, bool]:
    """(flax path, transpose) of a torch T5 parameter name."""
    path = name.replace(".block.", "/block_").replace(".layer.", "/layer_").replace(".", "/")
    if path.endswith("relative_attention_bias/weight"):
        return path.replace("/weight", "/embedding"), False
    if path == "shared/weight":
        return "shared/embedding", False
    if "layer_norm" in path:
        return path.replace("/weight", "/scale"), False
    return path.replace("/weight", "/kernel"), True


@pytest.fixture(
    scope="module", params=["relu-tied", pytest.param("gated-untied", marks=pytest.mark.slow)]
)
def t5_llm(request, tmp_path_factory):
    gated, tied = request.param == "gated-untied", request.param == "relu-tied"
    directory = tmp_path_factory.mktemp(request.param)
    model = write_t5(directory, gated=gated, tied=tied)
    batches = make_batches()
    scores = fisher_seq2seq.seq2seq_fisher_scores(
        str(directory), batches, keep_full=True, log=lambda s: None
    )
    return {"dir": directory, "model": model, "batches": batches, "scores": scores}


def test_t5_fisher_matches_torch_per_example_gradients(t5_llm):
    reference, count = torch_fisher(t5_llm["model"], t5_llm["batches"])
    scores = t5_llm["scores"]
    assert scores.examples == count == 5
    paths = {_flax_path(n)[0] for n in reference}
    assert set(scores.full) == paths
    for name, h in reference.items():
        path, transpose = _flax_path(name)
        ours = scores.full[path].T if transpose else scores.full[path]
        np.testing.assert_allclose(ours, h, rtol=2e-4, atol=1e-6 * np.abs(h).max(), err_msg=name)


def numpy_t5_scores(h: dict, cfg) -> dict:
    """The docstring's aggregates over torch's [out, in] tensors."""
    n, hd = cfg.num_heads, cfg.d_kv
    heads = lambda w, axis: np.moveaxis(w, axis, 0).reshape(n, hd, -1).sum((1, 2))  # noqa: E731
    hidden = h["shared.weight"].sum(0)
    hidden = hidden + h["encoder.final_layer_norm.weight"] + h["decoder.final_layer_norm.weight"]
    if "lm_head.weight" in h:
        hidden = hidden + h["lm_head.weight"].sum(0)
    out = {"hidden": hidden}
    for stack, depth in (("encoder", cfg.num_layers), ("decoder", cfg.num_decoder_layers)):
        out[f"{stack}_heads"] = np.zeros((depth, n))
        out[f"{stack}_ffn"] = np.zeros((depth, cfg.d_ff))
        if stack == "decoder":
            out["cross_heads"] = np.zeros((depth, n))
        for i in range(depth):
            g = {k.split(f"{stack}.block.{i}.", 1)[1]: v for k, v in h.items()
                 if k.startswith(f"{stack}.block.{i}.")}  # fmt: skip
            for name, v in g.items():
                kind = "cross_heads" if "EncDecAttention" in name else f"{stack}_heads"
                if "layer_norm" in name:
                    out["hidden"] = out["hidden"] + v
                elif "relative_attention_bias" in name:  # [buckets, heads]
                    out[kind][i] += v.sum(0)
                elif name.split(".")[-2] in ("q", "k", "v"):  # [heads x d_kv, d]
                    out[kind][i] += heads(v, 0)
                    out["hidden"] = out["hidden"] + v.sum(0)
                elif name.split(".")[-2] == "o":  # [d, heads x d_kv]
                    out[kind][i] += heads(v, 1)
                    out["hidden"] = out["hidden"] + v.sum(1)
                elif name.split(".")[-2] == "wo":  # [d, f]
                    out[f"{stack}_ffn"][i] += v.sum(0)
                    out["hidden"] = out["hidden"] + v.sum(1)
                else:  # wi, wi_0, wi_1 [f, d]
                    out[f"{stack}_ffn"][i] += v.sum(1)
                    out["hidden"] = out["hidden"] + v.sum(0)
    return out


def test_t5_importance_aggregates_equal_a_numpy_transcription(t5_llm):
    reference, _ = torch_fisher(t5_llm["model"], t5_llm["batches"])
    want = numpy_t5_scores(reference, t5_llm["model"].config)
    assert set(want) == set(fisher_seq2seq.SCORES)
    for name in fisher_seq2seq.SCORES:
        np.testing.assert_allclose(
            getattr(t5_llm["scores"], name), want[name], rtol=2e-4, err_msg=name
        )


def test_t5_scores_file_round_trip(t5_llm, tmp_path):
    path = t5_llm["scores"].save(tmp_path / "fisher.npz")
    back = fisher_seq2seq.Seq2SeqFisherScores.load(path)
    for name in fisher_seq2seq.SCORES:
        np.testing.assert_array_equal(getattr(back, name), getattr(t5_llm["scores"], name))
    assert back.examples == 5 and back.model_type == "t5"
    (tmp_path / "bad.npz").write_bytes(b"no")
    with pytest.raises(ValueError, match="not an encoder-decoder Fisher score file"):
        fisher_seq2seq.Seq2SeqFisherScores.load(tmp_path / "bad.npz")


def test_t5_fisher_reads_one_block_at_a_time(t5_llm, monkeypatch):
    """Forward: encoder blocks up, decoder blocks up; backward: decoder down, encoder down; each
    block's tensors read in one run."""
    import re

    from pifi_jax.hub.files import CheckpointReader

    order = []
    real_get = CheckpointReader.get

    def get(self, key):
        m = re.match(r"(encoder|decoder)\.block\.(\d+)\.", key)
        order.append((m.group(1)[0], int(m.group(2))) if m else key)
        return real_get(self, key)

    monkeypatch.setattr(CheckpointReader, "get", get)
    fisher_seq2seq.seq2seq_fisher_scores(
        str(t5_llm["dir"]), t5_llm["batches"][:1], log=lambda s: None
    )

    def runs(items):  # block reads, consecutive repeats merged
        out = []
        for item in items:
            if isinstance(item, tuple) and (not out or out[-1] != item):
                out.append(item)
        return out

    enc, dec = [("e", i) for i in range(2)], [("d", i) for i in range(3)]
    assert runs(order) == runs(enc + dec + dec[::-1] + enc[::-1])


# --- the T5 bridge ----------------------------------------------------------------------------


def numpy_t5_selection(s: dict, cfg, r: float) -> dict:
    def top(x, k):
        return sorted(sorted(range(len(x)), key=lambda j: (-x[j], j))[:k])

    f = np.sqrt(r)
    n, units = max(1, round(cfg.num_heads / f)), max(1, round(cfg.d_ff / f))
    return {
        "hidden": top(s["hidden"], max(1, round(cfg.d_model / f))),
        "encoder_heads": top(s["encoder_heads"].sum(0), n),  # one set per stack: shared bias
        "decoder_heads": top(s["decoder_heads"].sum(0), n),
        "cross_heads": [top(row, n) for row in s["cross_heads"]],
        "encoder_ffn": [top(row, units) for row in s["encoder_ffn"]],
        "decoder_ffn": [top(row, units) for row in s["decoder_ffn"]],
    }


def _llm(t5_llm):
    import pifi_jax

    return pifi_jax.from_pretrained(str(t5_llm["dir"]), task="seq2seq", log=lambda s: None)


def _logits(module, params, batch):
    start = np.zeros((batch["target_ids"].shape[0], 1), np.int32)
    decoder_ids = np.concatenate([start, batch["target_ids"][:, :-1]], axis=1)
    return np.asarray(
        module.apply(
            {"params": params},
            batch["input_ids"],
            batch["attention_mask"],
            decoder_ids,
            batch["target_mask"],
        )
    )


def test_t5_selection_keeps_the_brute_force_top_indices(t5_llm):
    from pifi_jax.bridge import seq2seq_bridge

    config = _llm(t5_llm)[0].config
    for r in (4, 16):
        want = numpy_t5_selection(t5_llm["scores"].scores, t5_llm["model"].config, r)
        got = seq2seq_bridge.select_seq2seq(t5_llm["scores"], config, r)
        for name, value in want.items():
            ours = getattr(got, name)
            ours = ours.tolist() if isinstance(ours, np.ndarray) else [v.tolist() for v in ours]
            assert ours == value, (r, name)
        back = seq2seq_bridge.Seq2SeqSelection.from_json(got.to_json())
        assert back.to_json() == got.to_json()


def test_t5_reduction_one_is_the_llm(t5_llm):
    from pifi_jax.bridge import seq2seq_bridge

    module, params = _llm(t5_llm)
    selection = seq2seq_bridge.select_seq2seq(t5_llm["scores"], module.config, 1)
    small, small_params = seq2seq_bridge.prune_seq2seq(
        str(t5_llm["dir"]), selection, log=lambda s: None
    )
    assert small.config == module.config
    batch = t5_llm["batches"][0]
    np.testing.assert_allclose(
        _logits(small, small_params, batch), _logits(module, params, batch), atol=1e-5
    )


def _zeroed_t5(params, config, sel):
    """The dense LLM with every dropped dimension, head and unit zeroed."""
    import jax.numpy as jnp

    from pifi_jax.hub.pretrained import _flatten, _unflatten

    flat = {p: np.array(v) for p, v in _flatten(params).items()}
    drop_h = np.setdiff1d(np.arange(config.d_model), sel.hidden)
    cols = lambda heads: (np.asarray(heads)[:, None] * config.d_kv + np.arange(config.d_kv)).ravel()  # noqa: E731
    inner = np.arange(config.num_heads * config.d_kv)
    flat["shared/embedding"][:, drop_h] = 0
    if "lm_head/kernel" in flat:
        flat["lm_head/kernel"][drop_h] = 0
    for path, value in flat.items():
        parts = path.split("/")
        if len(parts) < 4 or not parts[1].startswith("block_"):
            continue
        stack, i = parts[0], int(parts[1].split("_")[1])
        if parts[3] in ("SelfAttention", "EncDecAttention"):
            if parts[4] == "relative_attention_bias":
                continue  # the dropped heads' q, k, v and o are zero: their bias acts on nothing
            heads = (
                sel.cross_heads[i]
                if parts[3] == "EncDecAttention"
                else (sel.encoder_heads if stack == "encoder" else sel.decoder_heads)
            )
            drop = np.setdiff1d(inner, cols(heads))
            if parts[4] == "o":
                value[drop] = 0
                value[:, drop_h] = 0
            else:
                value[:, drop] = 0
        elif parts[3] == "DenseReluDense":
            units = (sel.encoder_ffn if stack == "encoder" else sel.decoder_ffn)[i]
            drop = np.setdiff1d(np.arange(config.d_ff), units)
            if parts[4] == "wo":
                value[drop] = 0
                value[:, drop_h] = 0
            else:
                value[:, drop] = 0
    return _unflatten({k: jnp.asarray(v) for k, v in flat.items()})


@pytest.mark.parametrize("r", [pytest.param(4, marks=pytest.mark.slow), 16])
def test_t5_bridge_is_the_dense_llm_with_the_dropped_parts_zeroed(t5_llm, r, tmp_path):
    from pifi_jax.bridge import seq2seq_bridge
    from pifi_jax.bridge.prune import save_bridge

    module, params = _llm(t5_llm)
    selection = seq2seq_bridge.select_seq2seq(t5_llm["scores"], module.config, r)
    small, small_params = seq2seq_bridge.prune_seq2seq(
        str(t5_llm["dir"]), selection, log=lambda s: None
    )
    assert small.config.d_model == len(selection.hidden) < module.config.d_model
    assert small.config.num_heads == len(selection.encoder_heads) < module.config.num_heads
    dense = _zeroed_t5(params, module.config, selection)
    for batch in t5_llm["batches"]:
        real = batch["target_mask"] > 0
        want = _logits(module, dense, batch)[real]
        got = _logits(small, small_params, batch)[real]
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    batch = t5_llm["batches"][1]
    real = batch["target_mask"] > 0
    full = _logits(module, params, batch)
    assert np.abs(full - _logits(small, small_params, batch))[real].max() > 1e-2
    # saved as a T5 checkpoint that transformers loads, with the same logits
    out = save_bridge(
        small, small_params, tmp_path / "b", llm=str(t5_llm["dir"]), selection=selection,
        reduction=r, scores=t5_llm["scores"],
    )  # fmt: skip
    theirs = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
    with torch.no_grad():
        start = torch.zeros((batch["target_ids"].shape[0], 1), dtype=torch.long)
        tgt = torch.tensor(batch["target_ids"], dtype=torch.long)
        logits = theirs(
            input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
            attention_mask=torch.tensor(batch["attention_mask"]),
            decoder_input_ids=torch.cat([start, tgt[:, :-1]], dim=1),
            decoder_attention_mask=torch.tensor(batch["target_mask"]),
        ).logits.numpy()
    np.testing.assert_allclose(logits[real], _logits(small, small_params, batch)[real], atol=3e-5)
