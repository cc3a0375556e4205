"""pifi_jax.load_layer: one decoder layer, read from only the shard(s) that hold it."""

import json
import shutil

import jax
import numpy as np
import pytest

import pifi_jax
from pifi_jax.hub import layer as layer_module
from pifi_jax.hub.files import CheckpointReader
from tests.test_models_decoders import tiny_decoder

torch = pytest.importorskip("torch")

LAYERS = 4


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory):
    """A 4-layer Llama (GQA, llama3 rope, biases) saved in several safetensors shards."""
    model = tiny_decoder("llama", num_hidden_layers=LAYERS)
    directory = tmp_path_factory.mktemp("sharded_llama")
    model.save_pretrained(directory, max_shard_size="20KB")
    weight_map = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) >= 4
    return model, directory, weight_map


class RecordingReader(CheckpointReader):
    instances: list = []

    def __init__(self, directory):
        super().__init__(directory)
        RecordingReader.instances.append(self)


def _shards_of_layer(weight_map, index):
    return {f for k, f in weight_map.items() if k.startswith(f"model.layers.{index}.")}


def _additive_mask(mask, causal):
    length = mask.shape[1]
    keep = mask[:, None, None, :].astype(bool)
    if causal:
        keep = keep & np.tril(np.ones((length, length), bool))[None, None]
    return torch.as_tensor(np.where(keep, 0.0, np.finfo(np.float32).min), dtype=torch.float32)


@pytest.mark.parametrize("index", [1, -1])
def test_layer_reads_only_its_shards_and_matches_the_torch_layer(sharded_llama, index, monkeypatch):
    model, directory, weight_map = sharded_llama
    RecordingReader.instances = []
    monkeypatch.setattr(layer_module, "CheckpointReader", RecordingReader)
    layer, params = pifi_jax.load_layer(directory, index)
    (reader,) = RecordingReader.instances
    wanted = _shards_of_layer(weight_map, index % LAYERS)
    assert reader.opened_files == wanted
    assert wanted < set(weight_map.values())
    assert layer.layer_index == index % LAYERS

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 7, 32)).astype(np.float32)
    mask = np.ones((2, 7), np.int32)
    mask[1, 5:] = 0
    positions = np.tile(np.arange(7), (2, 1))
    torch_layer = model.model.layers[index]
    xt = torch.as_tensor(x)
    position_ids = torch.as_tensor(positions)
    cos_sin = model.model.rotary_emb(xt, position_ids)
    for causal in [True, False]:  # PiFi runs the plugged layer non-causally over a sequence
        with torch.no_grad():
            theirs = torch_layer(
                xt,
                attention_mask=_additive_mask(mask, causal),
                position_embeddings=cos_sin,
                position_ids=position_ids,
            )
        out = layer.apply({"params": params}, x, attention_mask=mask, causal=causal)
        assert out.shape == x.shape
        np.testing.assert_allclose(np.asarray(out), theirs.numpy(), atol=1e-5)


def test_layer_params_equal_the_full_models_layer(sharded_llama):
    _, directory, _ = sharded_llama
    _, full = pifi_jax.from_pretrained(directory, task="decoder")
    _, params = pifi_jax.load_layer(directory, 2)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, full["model"]["layers_2"])


def test_out_of_range_index_names_the_valid_range(sharded_llama):
    _, directory, _ = sharded_llama
    for index in [LAYERS, -LAYERS - 1]:
        with pytest.raises(IndexError, match=f"-{LAYERS}..{LAYERS - 1}"):
            pifi_jax.load_layer(directory, index)


def test_length_one_input_reduces_to_the_closed_form(sharded_llama):
    """With one token at position 0, RoPE is the identity and attention picks the only value:
    h1 = x + W_o repeat_kv(W_v RMSNorm1(x));  out = h1 + MLP(RMSNorm2(h1))  (pifi.md)."""
    model, directory, _ = sharded_llama
    layer, params = pifi_jax.load_layer(directory, -1)
    cfg = layer.config
    p = jax.tree_util.tree_map(np.asarray, params)
    x = np.random.default_rng(1).normal(size=(3, 1, 32)).astype(np.float32)

    def rms(v, scale):
        return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + cfg.rms_norm_eps) * scale

    def dense(v, leaf):
        return v @ leaf["kernel"] + leaf.get("bias", 0.0)

    attn = p["self_attn"]
    value = dense(rms(x, p["input_layernorm"]["scale"]), attn["v_proj"])  # [3, 1, kv * d]
    value = value.reshape(3, 1, cfg.num_key_value_heads, cfg.head_dim)
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    value = np.repeat(value, groups, axis=2).reshape(3, 1, -1)  # repeat_kv
    h1 = x + dense(value, attn["o_proj"])
    mlp, n2 = p["mlp"], rms(h1, p["post_attention_layernorm"]["scale"])
    gate = dense(n2, mlp["gate_proj"])
    expected = h1 + dense(gate / (1 + np.exp(-gate)) * dense(n2, mlp["up_proj"]), mlp["down_proj"])
    for kwargs in [{}, {"attention_mask": np.ones((3, 1)), "positions": np.zeros((3, 1), int)}]:
        for causal in [True, False]:
            out = layer.apply({"params": params}, x, causal=causal, **kwargs)
            np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


def test_hub_id_downloads_only_config_index_and_the_layers_shards(
    sharded_llama, tmp_path, monkeypatch
):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    _, directory, weight_map = sharded_llama
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    requested = []

    def fake_download(repo_id, filename, revision=None, **kwargs):
        assert repo_id == "some-org/tiny-llama"
        requested.append(filename)
        if not (directory / filename).is_file():
            raise EntryNotFoundError(filename)
        shutil.copy(directory / filename, snapshot / filename)
        return str(snapshot / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    _, params = pifi_jax.load_layer("some-org/tiny-llama", -1)
    wanted = _shards_of_layer(weight_map, LAYERS - 1)
    assert set(requested) == {"config.json", "model.safetensors.index.json"} | wanted
    _, local = pifi_jax.load_layer(directory, -1)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, local)


@pytest.mark.parametrize("case", ["gemma2", "falcon", "gpt2"])
def test_other_families_load_their_layer_under_their_names(case, tmp_path):
    model = tiny_decoder(case, **({"n_layer": 3} if case == "gpt2" else {"num_hidden_layers": 3}))
    model.save_pretrained(tmp_path / "lm")
    # GPT-2 hub checkpoints have no `transformer.` prefix: h.{i}.*
    (model.transformer if case == "gpt2" else model).save_pretrained(tmp_path / "src")
    _, full = pifi_jax.from_pretrained(tmp_path / "lm", task="decoder")
    base = full["transformer"]["h_1"] if case in ("falcon", "gpt2") else full["model"]["layers_1"]
    layer, params = pifi_jax.load_layer(tmp_path / "src", -2)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, base)
    x = np.random.default_rng(0).normal(size=(2, 5, 32)).astype(np.float32)
    assert layer.apply({"params": params}, x, causal=False).shape == x.shape


def test_encoder_checkpoints_have_no_layer_to_plug(tiny_bert_dir):
    with pytest.raises(ValueError, match="not a decoder family"):
        pifi_jax.load_layer(tiny_bert_dir, -1)


def test_layer_loads_into_shardings_and_bfloat16(sharded_llama):
    import jax.numpy as jnp

    from pifi_jax import parallel

    _, directory, _ = sharded_llama
    mesh = parallel.make_mesh()
    layer, params = pifi_jax.load_layer(directory, -1, dtype=jnp.bfloat16, mesh=mesh)
    kernel = params["self_attn"]["q_proj"]["kernel"]
    assert kernel.dtype == jnp.bfloat16 and kernel.sharding.mesh.shape == mesh.shape
    _, reference = pifi_jax.load_layer(directory, -1)
    x = np.random.default_rng(0).normal(size=(2, 5, 32)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(layer.apply({"params": params}, x), np.float32),
        np.asarray(
            layer.clone(dtype=jnp.float32, param_dtype=jnp.float32).apply({"params": reference}, x)
        ),
        atol=0.1,
    )
