"""Prompt tuning (Lester et al. 2021, The Power of Scale for Parameter-Efficient Prompt Tuning).

P trained embeddings are put in front of the word embeddings; the rest of the model runs on
[prompt; sequence], P tokens longer:

    x = [prompt; word_embeddings(input_ids)]         # [batch, P + length, width]
    x = x + token_type(0 on the prompt) + position(0 .. P + length - 1);  mask 1 on the prompt

exactly what Hugging Face PEFT's sequence classification does (it passes inputs_embeds with the
mask and token types extended, and no position ids). The classification head therefore reads the
first prompt token's output, as it does there. RoBERTa numbers positions by counting non-padding
tokens; the prompt counts as tokens (PEFT, passing embeddings, numbers every slot in order: the two
agree on every unmasked slot of a right-padded batch, which is all the logits see). ELECTRA and
ALBERT embed into `embedding_size` before projecting, so their prompt is that wide.

Decoders (llama, mistral, qwen2, gemma2, falcon, gpt2) as PEFT's causal LM does it: the prompt
goes in front of the embedded tokens (Gemma-2's tokens are scaled by sqrt(hidden) inside
transformers' embedding module, the prompt is not; GPT-2 adds the position embeddings of slots
0..P-1 to it), positions count from the prompt's first slot, and the
logits cover the prompt slots too ([batch, P + length, vocab]; a next-token loss reads
logits[:, P:]). Decoding with a KVCache is refused (the prompt would need cache slots of its own).

Initialisation: "RANDOM" N(0, 1) as PEFT; "TEXT" the word embeddings of a text's tokens (repeated
or cut to P); "SAMPLE_VOCAB" those of P random vocabulary tokens.

Tree (added at the root; the family's own tree is unchanged; it trains, with the head):

    + prompt_encoder/embedding    [P, width]

    cfg = pifi_jax.peft.PromptTuningConfig(
        num_virtual_tokens=8, prompt_tuning_init="TEXT",
        prompt_tuning_init_text="Classify the sentiment:", tokenizer_name_or_path="asset:minilm")
    module, params = pifi_jax.from_pretrained("asset:minilm", num_labels=2, peft=cfg)
    pifi_jax.peft.save_adapter(module, params, "adapter/")  # loads in Hugging Face PEFT

Families: BERT, RoBERTa, ELECTRA, ALBERT, DeBERTa (v1, v2/v3) and the decoders (targets.
PROMPT_FAMILIES). Not mergeable.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pifi_jax.peft.config import PromptTuningConfig
from pifi_jax.peft.targets import PROMPT_FAMILIES

LEAF = "prompt_encoder/embedding"
_WORD_EMBEDDINGS = re.compile(r"(.*/)?(word_embeddings|embed_tokens|wte)/embedding")


class PromptEncoder(nn.Module):
    """Returns the soft prompt [P, width]."""

    num_virtual_tokens: int
    width: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self) -> jax.Array:
        init = nn.initializers.normal(stddev=1.0)  # torch.nn.Embedding's default, as HF PEFT
        return self.param(
            "embedding", init, (self.num_virtual_tokens, self.width), self.param_dtype
        )


def embedding_width(model_config) -> int:
    """Width of the word embeddings (ELECTRA/ALBERT: embedding_size, before the projection)."""
    return getattr(model_config, "embedding_size", None) or model_config.hidden_size


def encoder_for(config: PromptTuningConfig, model_config, param_dtype) -> PromptEncoder:
    if model_config.model_type not in PROMPT_FAMILIES:
        raise ValueError(
            f"prompt tuning is not supported for {model_config.model_type!r}; it is for "
            f"{list(PROMPT_FAMILIES)}"
        )
    width = embedding_width(model_config)
    if config.token_dim is not None and config.token_dim != width:
        raise ValueError(f"prompt made for token_dim={config.token_dim}; this model embeds {width}")
    return PromptEncoder(config.num_virtual_tokens, width, param_dtype)


def initialise_from_vocabulary(
    config: PromptTuningConfig, model_config, flat: dict, seed: int
) -> dict:
    """TEXT / SAMPLE_VOCAB: the prompt leaf becomes the model's embeddings of vocabulary tokens
    (rows of the word embeddings, times the family's `embed_scale` where it has one: Gemma-2)."""
    if config.prompt_tuning_init == "RANDOM":
        return flat
    table = next(v for p, v in flat.items() if _WORD_EMBEDDINGS.fullmatch(p))  # [vocab, width]
    if config.prompt_tuning_init == "TEXT":
        ids = jnp.asarray(config.init_token_ids(), jnp.int32)
    else:
        key = jax.random.PRNGKey(seed)
        ids = jax.random.randint(key, (config.num_virtual_tokens,), 0, table.shape[0])
    if int(jnp.max(ids)) >= table.shape[0]:
        raise ValueError(
            f"prompt init token ids reach {int(jnp.max(ids))}; vocabulary {table.shape[0]}"
        )
    prompt = flat[LEAF]
    rows = table[ids]
    scale = getattr(model_config, "embed_scale", None)
    if scale is not None:
        rows = rows * jnp.asarray(scale, table.dtype)
    flat = dict(flat)
    flat[LEAF] = jax.device_put(rows.astype(prompt.dtype), getattr(prompt, "sharding", None))
    return flat
