"""PiFi with a decoder SLM: classification on the last real token and causal generation with the
plugged layer before the LM head, each against a PyTorch composition of transformers' models.

SLM: a tiny random Llama (conftest's word-level decoder, untied, or a tied one); LLM: a tiny random
Qwen2 of another width (48, so W_in / W_out are not square) whose last layer is plugged in. The
references run transformers' LlamaModel / LlamaForCausalLM, then W_in -> Qwen2DecoderLayer (causal
and padding masked for the sequence, RoPE at the sequence's positions) -> W_out in PyTorch with the
same weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pifi_jax import pifi
from pifi_jax.generate import generate
from pifi_jax.hub import from_pretrained
from pifi_jax.train import train_and_evaluate
from pifi_jax.train.partition import flatten
from tests.conftest import load_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 33  # conftest's tiny word-level vocabulary


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    from tests.test_models_decoders import tiny_decoder

    directory = tmp_path_factory.mktemp("tiny_qwen2")
    model = tiny_decoder("qwen2", seed=1, hidden_size=48, use_sliding_window=False)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tied_slm_dir(tmp_path_factory):
    from tests.test_models_decoders import tiny_decoder

    directory = tmp_path_factory.mktemp("tiny_tied_llama")
    tiny_decoder("llama", seed=2, vocab_size=VOCAB, tie_word_embeddings=True).save_pretrained(
        directory
    )
    return directory


def _batch(left: bool, batch=3, length=8, seed=0):
    """ids over the tiny vocabulary with rows b shorter by 2 b (padded on the left or right)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, VOCAB, size=(batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    for b in range(1, batch):
        if left:
            mask[b, : 2 * b] = 0
        else:
            mask[b, length - 2 * b :] = 0
    return ids * mask, mask


def _positions(mask):
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def _linear(kernel, bias=None):
    out = torch.nn.Linear(*np.asarray(kernel).shape, bias=bias is not None)
    out.weight.data = torch.tensor(np.asarray(kernel, np.float32).T.copy())
    if bias is not None:
        out.bias.data = torch.tensor(np.asarray(bias, np.float32))
    return out


def _torch_layer(qwen_dir):
    llm = transformers.AutoModelForCausalLM.from_pretrained(qwen_dir, attn_implementation="eager")
    return llm.eval().model


def _plug(llm, w_in, w_out, h, mask, positions, causal=True):
    """W_in -> the LLM's last layer -> W_out over h [batch, length, d_s] in PyTorch."""
    x = w_in(h)
    cos_sin = llm.rotary_emb(x, positions)
    length = h.shape[1]
    allowed = mask[:, None, None, :].bool().expand(-1, 1, length, -1)
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool).tril()
    additive = (~allowed).float() * torch.finfo(torch.float32).min
    y = llm.layers[-1](
        x, attention_mask=additive, position_ids=positions, position_embeddings=cos_sin
    )
    return w_out(y[0] if isinstance(y, tuple) else y)


def _perturb_w_out(params, seed=0):
    """W_out away from its zero start (the residual plug-in would otherwise add nothing)."""
    kernel = params["pifi"]["w_out"]["kernel"]
    noise = 0.3 * jax.random.normal(jax.random.PRNGKey(seed), kernel.shape, kernel.dtype)
    return {**params, "pifi": {**params["pifi"], "w_out": {"kernel": noise}}}


def _causal(slm_dir, qwen_dir, **kw):
    return pifi.build(
        slm_dir, qwen_dir, -1, task="causal_lm", layer_dtype=jnp.float32, log=print, **kw
    )


# ---------------------------------------------------------------------------------------------
# Causal generation: SLM -> [plug-in] -> LM head


def _composition_cases():
    """(residual, tied, left): two in the default run that between them take every option; the
    other six with -m slow."""
    default = {(True, False, False), (False, True, True)}
    for residual in (True, False):
        for tied in (False, True):
            for left in (False, True):
                marks = [] if (residual, tied, left) in default else [pytest.mark.slow]
                yield pytest.param(residual, tied, left, marks=marks)


@pytest.mark.parametrize("residual, tied, left", list(_composition_cases()))
def test_causal_lm_matches_a_pytorch_composition(
    tiny_llama_dir, tied_slm_dir, qwen_dir, residual, tied, left
):
    slm_dir = tied_slm_dir if tied else tiny_llama_dir
    module, params = _causal(slm_dir, qwen_dir, residual=residual)
    assert isinstance(module, pifi.PifiCausalLM)
    assert ("lm_head" in params) != tied and params["pifi"]["w_in"]["kernel"].shape == (32, 48)
    params = _perturb_w_out(params)
    ids, mask = _batch(left)
    logits = np.asarray(jax.jit(module.apply)({"params": params}, ids, mask))

    lm = transformers.AutoModelForCausalLM.from_pretrained(slm_dir, attn_implementation="eager")
    lm = lm.eval()
    llm = _torch_layer(qwen_dir)
    plug = params["pifi"]
    w_in, w_out = _linear(plug["w_in"]["kernel"]), _linear(plug["w_out"]["kernel"])
    with torch.no_grad():
        t_ids, t_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask)
        positions = torch.tensor(_positions(mask))
        h = lm.model(t_ids, attention_mask=t_mask, position_ids=positions).last_hidden_state
        z = _plug(llm, w_in, w_out, h, t_mask, positions)
        expected = lm.lm_head(h + z if residual else z).numpy()
    real = mask > 0
    np.testing.assert_allclose(logits[real], expected[real], atol=3e-5)
    # The layer contributes: the SLM's own logits are far from these.
    with torch.no_grad():
        alone = lm(t_ids, attention_mask=t_mask, position_ids=positions).logits.numpy()
    assert np.abs(alone[real] - logits[real]).max() > 1e-2


def test_residual_plug_in_starts_as_the_slm_and_base_is_the_slm(tiny_llama_dir, qwen_dir):
    module, params = _causal(tiny_llama_dir, qwen_dir)
    assert not np.any(np.asarray(params["pifi"]["w_out"]["kernel"]))  # W_out starts at zero
    assert np.any(np.asarray(params["pifi"]["w_in"]["kernel"]))
    plain, plain_params = from_pretrained(tiny_llama_dir, task="causal_lm", log=print)
    ids, mask = _batch(left=False)
    ours = module.apply({"params": params}, ids, mask)
    np.testing.assert_array_equal(
        np.asarray(ours), np.asarray(plain.apply({"params": plain_params}, ids, mask))
    )
    base, base_params = pifi.build(tiny_llama_dir, None, task="causal_lm", method="base", log=print)
    assert base.pifi is None and set(base_params) == set(plain_params)
    np.testing.assert_array_equal(
        np.asarray(base.apply({"params": base_params}, ids, mask)), np.asarray(ours)
    )


def test_causal_plug_in_ignores_padding(tiny_llama_dir, qwen_dir):
    module, params = _causal(tiny_llama_dir, qwen_dir)
    params = _perturb_w_out(params)
    apply = jax.jit(lambda ids, mask: module.apply({"params": params}, ids, mask))
    for left in (False, True):
        ids, mask = _batch(left)
        real = mask > 0
        other = np.where(real, ids, 7)  # other tokens in the padded slots
        np.testing.assert_allclose(
            np.asarray(apply(other, mask))[real], np.asarray(apply(ids, mask))[real], atol=1e-6
        )
        # A padded row scores as the same row alone, unpadded.
        row = 2
        n = int(mask[row].sum())
        cut = slice(None, n) if not left else slice(-n, None)
        alone = apply(ids[row : row + 1, cut], mask[row : row + 1, cut])
        np.testing.assert_allclose(
            np.asarray(apply(ids, mask))[row, cut], np.asarray(alone)[0], atol=1e-5
        )


@pytest.mark.slow
def test_packed_segments_get_their_logits_alone(tiny_llama_dir, qwen_dir):
    """data.pack=True rows (segment ids 1, 2, ... in the mask): the plugged layer, like the SLM,
    attends within each segment and restarts its positions there."""
    module, params = _causal(tiny_llama_dir, qwen_dir)
    params = _perturb_w_out(params)
    rng = np.random.default_rng(0)
    segments = [rng.integers(4, VOCAB, size=n).astype(np.int32) for n in (5, 7, 4)]
    ids = np.zeros((1, 19), np.int32)
    mask = np.zeros((1, 19), np.int32)
    end = 0
    for number, segment in enumerate(segments, start=1):
        begin, end = end, end + len(segment)
        ids[0, begin:end], mask[0, begin:end] = segment, number
    packed = np.asarray(module.apply({"params": params}, ids, mask))
    end = 0
    for segment in segments:
        begin, end = end, end + len(segment)
        alone = module.apply(
            {"params": params}, segment[None], np.ones((1, len(segment)), np.int32)
        )
        np.testing.assert_allclose(packed[0, begin:end], np.asarray(alone)[0], atol=1e-5)


def test_generation_with_the_cache_equals_recomputing_every_step(tied_slm_dir, qwen_dir):
    module, params = _causal(tied_slm_dir, qwen_dir)
    params = _perturb_w_out(params, seed=3)
    ids, mask = _batch(left=True)
    steps = 5
    tokens = generate(module, params, ids, mask, max_new_tokens=steps, eos_token_id=())
    apply = jax.jit(lambda i, m: module.apply({"params": params}, i, m))
    seq, seq_mask, expected = ids, mask, []
    for _ in range(steps):  # no cache: the whole sequence again, the last slot's argmax
        nxt = np.argmax(np.asarray(apply(seq, seq_mask))[:, -1], axis=-1).astype(np.int32)
        expected.append(nxt)
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
        seq_mask = np.concatenate([seq_mask, np.ones_like(nxt)[:, None]], axis=1)
    np.testing.assert_array_equal(np.asarray(tokens), np.stack(expected, axis=1))
    # One beam is greedy search; several beams reorder both caches and still run.
    one_beam = generate(module, params, ids, mask, max_new_tokens=steps, method="beam",
                        num_beams=1, eos_token_id=())  # fmt: skip
    np.testing.assert_array_equal(np.asarray(one_beam), np.asarray(tokens))
    beams = generate(module, params, ids, mask, max_new_tokens=steps, method="beam",
                     num_beams=3, eos_token_id=())  # fmt: skip
    np.testing.assert_array_equal(
        np.asarray(beams), _beam_search_without_cache(apply, ids, mask, 3, steps)
    )


def _beam_search_without_cache(apply, ids, mask, beams, steps):
    """Beam search with no eos: keep the `beams` continuations of highest summed log-probability,
    each step scored by running the whole sequences again; the best after `steps` tokens."""
    out = []
    for row in range(ids.shape[0]):
        hyps = [(0.0, [])]
        for _ in range(steps):
            seqs = np.array([np.concatenate([ids[row], h]) for _, h in hyps], np.int32)
            masks = np.array(
                [np.concatenate([mask[row], np.ones(len(h), np.int32)]) for _, h in hyps]
            )
            logp = jax.nn.log_softmax(np.asarray(apply(seqs, masks), np.float64)[:, -1], axis=-1)
            candidates = [
                (score + float(logp[b, t]), h + [t])
                for b, (score, h) in enumerate(hyps)
                for t in range(logp.shape[-1])
            ]
            hyps = sorted(candidates, key=lambda c: -c[0])[:beams]
        out.append(hyps[0][1])
    return np.array(out, np.int32)


# ---------------------------------------------------------------------------------------------
# Classification on the last real token


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_decoder_classifier_matches_a_pytorch_composition(tiny_llama_dir, qwen_dir, mode):
    module, params = pifi.build(tiny_llama_dir, qwen_dir, -1, num_labels=3, mode=mode,
                                layer_dtype=jnp.float32, log=print)  # fmt: skip
    assert isinstance(module, pifi.PifiClassifier) and module.pooling == "last"
    assert set(params) == {"model", "pifi", "head"}  # the bare stack: no lm_head
    ids, mask = _batch(left=False)
    logits = np.asarray(jax.jit(module.apply)({"params": params}, ids, mask))

    model = transformers.AutoModel.from_pretrained(tiny_llama_dir, attn_implementation="eager")
    model = model.eval()
    llm = _torch_layer(qwen_dir)
    plug, head = params["pifi"], params["head"]
    w_in, w_out = _linear(plug["w_in"]["kernel"]), _linear(plug["w_out"]["kernel"])
    dense = _linear(head["dense"]["kernel"], head["dense"]["bias"])
    out_proj = _linear(head["out_proj"]["kernel"], head["out_proj"]["bias"])
    with torch.no_grad():
        t_mask = torch.tensor(mask)
        positions = torch.tensor(_positions(mask))
        h = model(torch.tensor(ids, dtype=torch.long), attention_mask=t_mask).last_hidden_state
        last = torch.tensor(mask.sum(axis=1) - 1)
        if mode == "sequence":
            h = _plug(llm, w_in, w_out, h, t_mask, positions)
            pooled = h[torch.arange(3), last]
        else:  # one token at position 0
            one = torch.ones(3, 1, dtype=torch.long)
            pooled = _plug(llm, w_in, w_out, h[torch.arange(3), last][:, None], one, 0 * one)[:, 0]
        expected = out_proj(torch.nn.functional.gelu(dense(pooled))).numpy()
    np.testing.assert_allclose(logits, expected, atol=3e-5)
    # Padding is not read: other tokens in the padded slots give the same logits.
    other = np.where(mask > 0, ids, 9)
    np.testing.assert_allclose(np.asarray(module.apply({"params": params}, other, mask)), logits,
                               atol=1e-6)  # fmt: skip


def test_decoder_slm_refusals(tiny_llama_dir, tiny_bert_dir, qwen_dir):
    from pifi_jax.peft import PromptTuningConfig

    with pytest.raises(ValueError, match="pifi.pooling='cls' reads a decoder SLM's first token"):
        pifi.build(tiny_llama_dir, qwen_dir, pooling="cls", log=print)
    with pytest.raises(ValueError, match="PiFi.s causal LM needs a decoder SLM"):
        pifi.build(tiny_bert_dir, qwen_dir, task="causal_lm", log=print)
    with pytest.raises(ValueError, match="extractive QA needs an encoder SLM"):
        pifi.build(tiny_llama_dir, qwen_dir, task="question_answering", mode="sequence", log=print)
    with pytest.raises(ValueError, match="prompt tuning's soft tokens"):
        _causal(tiny_llama_dir, qwen_dir, peft=PromptTuningConfig(num_virtual_tokens=2))
    # Prompt tuning with the decoder classifier: its soft tokens stand in front, the last real
    # token is read behind them.
    module, params = pifi.build(tiny_llama_dir, qwen_dir, num_labels=2, log=print,
                                peft=PromptTuningConfig(num_virtual_tokens=3))  # fmt: skip
    ids, mask = _batch(left=False)
    logits = np.asarray(module.apply({"params": params}, ids, mask))
    other = np.where(mask > 0, ids, 9)
    np.testing.assert_allclose(np.asarray(module.apply({"params": params}, other, mask)), logits,
                               atol=1e-6)  # fmt: skip
    # The causal SLM's state at the last real token is the only one that sees that token: a
    # different last token changes every row's logits.
    last = mask.sum(axis=1) - 1
    changed = ids.copy()
    changed[np.arange(3), last] = np.where(ids[np.arange(3), last] == 5, 6, 5)
    moved = np.abs(np.asarray(module.apply({"params": params}, changed, mask)) - logits)
    assert np.all(moved.max(axis=1) > 1e-4)


# ---------------------------------------------------------------------------------------------
# The trainer: configs/pifi.py with a decoder SLM


def test_pifi_generation_run_trains_the_plug_in_and_scores_text(
    tiny_llama_dir, qwen_dir, tiny_pair_files, tmp_path
):
    overrides = [
        f"--config.model.path={tiny_llama_dir}",
        f"--config.pifi.llm={qwen_dir}",
        "--config.pifi.layer_dtype=float32",
        *[f"--config.data.data_files.{s}={p}" for s, p in tiny_pair_files.items()],
    ]
    config = load_config("configs/pifi.py:task=pairs,runlocal", overrides)
    assert config.objective == "causal_lm" and config.peft.method == "lora"
    results = train_and_evaluate(config, tmp_path / "run")
    for split in ("validation", "test"):
        assert np.isfinite(results[f"{split}/rougeL"])
    from pifi_jax.train.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path / "run" / "checkpoints")
    try:
        state, _ = ckpt.restore(None)
    finally:
        ckpt.close()
    flat = flatten(state["params"])
    assert not any(p.startswith("pifi/llm_layer/") for p in flat)  # frozen: not checkpointed
    assert np.abs(np.asarray(flat["pifi/w_out/kernel"])).max() > 0  # moved off its zero start
    assert (tmp_path / "run" / "adapter" / "pifi_plugin.safetensors").is_file()
    _predictor_repeats_the_test_predictions(tmp_path / "run", tiny_pair_files["test"])


def _predictor_repeats_the_test_predictions(workdir, test_file):
    """launch.predict's Predictor rebuilds the PiFi model from the run directory (the layer
    loaded again, the trained leaves restored) and generates what the run's evaluation did."""
    import csv
    import json

    from pifi_jax.train.predict import Predictor

    records = [json.loads(line) for line in open(workdir / "predictions_test.jsonl")]
    with open(test_file, newline="") as f:
        sources = [row["source"] for row in csv.DictReader(f)]
    predictor = Predictor.from_workdir(workdir)
    rows = predictor.predict(([sources[r["index"]] for r in records],), progress=False)
    assert [row["generated"] for row in rows] == [r["prediction"] for r in records]


def test_pifi_classification_run_with_a_decoder_slm(
    tiny_llama_dir, qwen_dir, tiny_task_files, tmp_path
):
    from tests.conftest import tiny_overrides

    overrides = [
        *tiny_overrides(tiny_llama_dir, tiny_task_files),
        f"--config.pifi.llm={qwen_dir}",
        "--config.pifi.pooling=last",
    ]
    results = train_and_evaluate(load_config("configs/pifi.py:runlocal", overrides), tmp_path)
    assert np.isfinite(results["test/accuracy"])
