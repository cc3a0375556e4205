"""PiFi with an encoder-decoder SLM (T5, BART): the plugged layer over the encoder states, which
become the decoder's cross-attention memory; against a PyTorch composition of transformers' T5 /
BART and LlamaDecoderLayer built from the same tiny random weights, through generation, and in
the trainer.
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
from tests.conftest import load_config, write_tiny_seq2seq
from tests.test_pifi import write_tiny_llm
from tests.test_pifi_decoder import (
    _linear,
    _perturb_w_out,
    _predictor_repeats_the_test_predictions,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 33


@pytest.fixture(scope="module")
def slm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_seq2seq")
    return {family: write_tiny_seq2seq(root / family, family) for family in ("t5", "bart")}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return write_tiny_llm(tmp_path_factory.mktemp("tiny_llm") / "llama", "llama")


def _batch(batch=3, length=9, seed=0):
    """Sources padded on the right (row b shorter by 2 b), decoder inputs of 5 tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, VOCAB, size=(batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    for b in range(1, batch):
        mask[b, length - 2 * b :] = 0
    decoder_ids = rng.integers(4, VOCAB, size=(batch, 5)).astype(np.int32)
    return ids * mask, mask, decoder_ids


def _build(slm_dir, llm_dir, **kw):
    return pifi.build(slm_dir, llm_dir, -1, task="seq2seq", layer_dtype=jnp.float32, log=print,
                      **kw)  # fmt: skip


def _torch_memory(llm_dir, params, h, mask):
    """W_in -> LlamaDecoderLayer (both ways, padded keys masked, RoPE 0..S-1) -> W_out."""
    llm = transformers.AutoModelForCausalLM.from_pretrained(llm_dir, attn_implementation="eager")
    llm = llm.eval().model
    plug = params["pifi"]
    w_in, w_out = _linear(plug["w_in"]["kernel"]), _linear(plug["w_out"]["kernel"])
    x = w_in(h)
    batch, length = mask.shape
    positions = torch.arange(length)[None].expand(batch, -1)
    additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    additive = additive.expand(-1, 1, length, -1)
    y = llm.layers[-1](
        x,
        attention_mask=additive,
        position_ids=positions,
        position_embeddings=llm.rotary_emb(x, positions),
    )
    return w_out(y[0] if isinstance(y, tuple) else y)


@pytest.mark.parametrize(
    "family, residual",
    [
        ("t5", False),
        ("bart", True),
        pytest.param("t5", True, marks=pytest.mark.slow),
        pytest.param("bart", False, marks=pytest.mark.slow),
    ],
)
def test_seq2seq_matches_a_pytorch_composition(slm_dirs, llama_dir, family, residual):
    module, params = _build(slm_dirs[family], llama_dir, residual=residual)
    assert isinstance(module, pifi.PifiSeq2Seq) and module.is_encoder_decoder
    assert not np.any(np.asarray(params["pifi"]["w_out"]["kernel"])) == residual
    params = _perturb_w_out(params)
    ids, mask, decoder_ids = _batch()
    logits = np.asarray(jax.jit(module.apply)({"params": params}, ids, mask, decoder_ids))

    ref = transformers.AutoModelForSeq2SeqLM.from_pretrained(slm_dirs[family])
    ref = ref.eval()
    with torch.no_grad():
        t_ids, t_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask)
        h = ref.get_encoder()(input_ids=t_ids, attention_mask=t_mask).last_hidden_state
        memory = _torch_memory(llama_dir, params, h, t_mask)
        if residual:
            memory = h + memory
        expected = ref(
            encoder_outputs=(memory,),
            attention_mask=t_mask,
            decoder_input_ids=torch.tensor(decoder_ids, dtype=torch.long),
        ).logits.numpy()
        plain = ref(
            input_ids=t_ids, attention_mask=t_mask, decoder_input_ids=torch.tensor(decoder_ids)
        ).logits.numpy()
    np.testing.assert_allclose(logits, expected, atol=3e-5)
    assert np.abs(plain - logits).max() > 1e-3  # the memory is not the SLM's own


def test_seq2seq_memory_ignores_padding_and_base_is_the_slm(slm_dirs, llama_dir):
    module, params = _build(slm_dirs["t5"], llama_dir)
    ids, mask, decoder_ids = _batch()
    apply = jax.jit(lambda i, m: module.apply({"params": params}, i, m, decoder_ids))
    other = np.where(mask > 0, ids, 7)
    np.testing.assert_allclose(np.asarray(apply(other, mask)), np.asarray(apply(ids, mask)),
                               atol=1e-6)  # fmt: skip
    base, base_params = pifi.build(slm_dirs["t5"], None, task="seq2seq", method="base", log=print)
    plain, plain_params = from_pretrained(slm_dirs["t5"], task="seq2seq", log=print)
    np.testing.assert_array_equal(
        np.asarray(base.apply({"params": base_params}, ids, mask, decoder_ids)),
        np.asarray(plain.apply({"params": plain_params}, ids, mask, decoder_ids)),
    )


@pytest.mark.parametrize("family", ["t5", pytest.param("bart", marks=pytest.mark.slow)])
def test_generation_decodes_from_the_plugged_memory(slm_dirs, llama_dir, family):
    module, params = _build(slm_dirs[family], llama_dir)
    ids, mask, _ = _batch()
    steps = 4
    tokens = np.asarray(generate(module, params, ids, mask, max_new_tokens=steps,
                                 eos_token_id=()))  # fmt: skip
    # No cache: the whole decoder input again each step, the plugged memory recomputed.
    apply = jax.jit(lambda d: module.apply({"params": params}, ids, mask, d))
    decoder = np.full((3, 1), module.config.decoder_start_token_id, np.int32)
    for _ in range(steps):
        nxt = np.argmax(np.asarray(apply(decoder))[:, -1], axis=-1).astype(np.int32)
        decoder = np.concatenate([decoder, nxt[:, None]], axis=1)
    np.testing.assert_array_equal(tokens, decoder[:, 1:])
    beams = generate(module, params, ids, mask, max_new_tokens=steps, method="beam", num_beams=1,
                     eos_token_id=())  # fmt: skip
    np.testing.assert_array_equal(np.asarray(beams), tokens)


def test_seq2seq_refusals(slm_dirs, llama_dir, tiny_llama_dir):
    with pytest.raises(ValueError, match="is for the seq2seq objective"):
        pifi.build(slm_dirs["t5"], llama_dir, task="classification", log=print)
    with pytest.raises(ValueError, match="is for the seq2seq objective"):
        pifi.build(tiny_llama_dir, llama_dir, task="seq2seq", log=print)
    with pytest.raises(ValueError, match="an encoder-decoder: use the seq2seq objective"):
        pifi.build(slm_dirs["bart"], llama_dir, task="causal_lm", log=print)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bart", "t5"])
def test_pifi_seq2seq_run(slm_dirs, llama_dir, tiny_pair_files, tmp_path, family):
    overrides = [
        f"--config.model.path={slm_dirs[family]}",
        f"--config.pifi.llm={llama_dir}",
        *[f"--config.data.data_files.{s}={p}" for s, p in tiny_pair_files.items()],
    ]
    config = load_config("configs/pifi.py:task=pairs,seq2seq,runlocal", overrides)
    assert config.objective == "seq2seq" and config.pifi.residual is False
    results = train_and_evaluate(config, tmp_path / "run")
    for split in ("validation", "test"):
        assert np.isfinite(results[f"{split}/rougeL"]) and np.isfinite(results[f"{split}/bleu"])
    _predictor_repeats_the_test_predictions(tmp_path / "run", tiny_pair_files["test"])
