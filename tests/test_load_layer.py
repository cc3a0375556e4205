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


# One child python with 8 fake CPU devices (the device count is read once, when XLA's backend
# starts): the last layer loaded onto an fsdp=2 x tensor=4 mesh in float32 and bfloat16, its
# shards compared with the transformers weights they come from, and its outputs with the
# transformers layer's (the same random weights, causal and not). The transformers side is
# computed here and handed over in an .npz, so that the child imports no torch.
_SHARDED_SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
import pifi_jax
from pifi_jax import parallel

directory, given = sys.argv[1], np.load(sys.argv[2])
x, mask = given["x"], given["mask"]
mesh = parallel.make_mesh({"fsdp": 2, "tensor": 4})
out = {}
for dtype in ("float32", "bfloat16"):
    layer, params = pifi_jax.load_layer(directory, -1, dtype=getattr(jnp, dtype), mesh=mesh)
    leaves = {}
    for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.down_proj"):
        kernel = params
        for part in module.split("."):
            kernel = kernel[part]
        kernel = kernel["kernel"]
        expected = given[module].T.astype(kernel.dtype)  # [in, out]
        leaves[module] = {
            "dtype": str(kernel.dtype),
            "spec": [a for a in kernel.sharding.spec],
            "devices": len(kernel.sharding.device_set),
            "shard_shapes": sorted({tuple(s.data.shape) for s in kernel.addressable_shards}),
            "shards_equal": all(
                np.array_equal(np.asarray(s.data), expected[s.index])
                for s in kernel.addressable_shards
            ),
        }
    gaps, apply = {}, jax.jit(layer.apply, static_argnames="causal")
    for causal in ("causal", "bidirectional"):
        ours = apply({"params": params}, x, attention_mask=mask, causal=causal == "causal")
        gaps[causal] = float(np.abs(np.asarray(ours, np.float32) - given[causal]).max())
    out[dtype] = {"leaves": leaves, "gaps": gaps}
print("RESULT " + json.dumps(out))
"""
# bfloat16 weights and activations (8 bits of mantissa) against the float32 transformers layer:
# measured 1.1e-2 (outputs of magnitude ~3, a few bfloat16 ulps); float32: measured 5e-7.
BF16_ATOL = 2e-2
F32_ATOL = 1e-5
# embed over fsdp, heads over tensor; kv stays whole (DEFAULT_RULES), and mlp (37) is odd.
SHARDED_KERNELS = {
    "self_attn.q_proj": (["fsdp", "tensor"], [(16, 8)]),
    "self_attn.k_proj": (["fsdp", None], [(16, 16)]),
    "self_attn.o_proj": (["tensor", "fsdp"], [(8, 16)]),
    "mlp.down_proj": ([None, "fsdp"], [(37, 16)]),
}


def test_layer_loads_into_shardings_and_bfloat16(sharded_llama, tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO, subprocess_env

    model, directory, _ = sharded_llama
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 7, 32)).astype(np.float32)
    mask = np.ones((2, 7), np.int32)
    mask[1, 5:] = 0
    torch_layer = model.model.layers[-1]
    position_ids = torch.as_tensor(np.tile(np.arange(7), (2, 1)))
    cos_sin = model.model.rotary_emb(torch.as_tensor(x), position_ids)
    given = {"x": x, "mask": mask}
    for name, causal in (("causal", True), ("bidirectional", False)):
        with torch.no_grad():
            given[name] = torch_layer(
                torch.as_tensor(x),
                attention_mask=_additive_mask(mask, causal),
                position_embeddings=cos_sin,
                position_ids=position_ids,
            ).numpy()
    for module in SHARDED_KERNELS:
        given[module] = torch_layer.get_submodule(module).weight.detach().numpy()
    np.savez(tmp_path / "given.npz", **given)
    env = subprocess_env(8)
    env["XLA_FLAGS"] += " --xla_backend_optimization_level=0"  # compiles faster, same numbers
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED_SCRIPT, str(directory), str(tmp_path / "given.npz")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    runs = json.loads(line[len("RESULT ") :])
    for dtype, tolerance in (("float32", F32_ATOL), ("bfloat16", BF16_ATOL)):
        for module, (spec, shapes) in SHARDED_KERNELS.items():
            leaf = runs[dtype]["leaves"][module]
            assert leaf["dtype"] == dtype, (dtype, module)
            assert leaf["spec"] == spec, (dtype, module)
            assert leaf["devices"] == 8, (dtype, module)
            assert [tuple(s) for s in leaf["shard_shapes"]] == shapes, (dtype, module)
            assert leaf["shards_equal"], f"{dtype} {module}: a device holds the wrong slice"
        for causal, gap in runs[dtype]["gaps"].items():
            assert gap <= tolerance, (dtype, causal, gap)
