"""PiFi (Kim et al., ACL 2025): one frozen LLM decoder layer between a small model and its head.

    h      = SLM(input_ids, attention_mask, token_type_ids)   # [batch, length, d_s]
    c      = h[:, 0]   (pooling="cls"; "mean" = masked mean)  # [batch, d_s]
    x      = W_in c                                            # [batch, 1, d_llm]   no bias
    y      = LLMLayer(x, positions 0, all-ones mask)           # frozen
    z      = W_out y[:, 0]                                     # [batch, d_s]        no bias
    logits = out_proj(gelu(dropout(dense(z))))                 # dropout BEFORE gelu, as the paper

`method="base"` is the same encoder and head without W_in / LLMLayer / W_out (the paper's baseline).
`mode="sequence"` runs W_in -> LLMLayer -> W_out over the whole encoder output instead (padding
masked, RoPE positions 0..length-1, attention both ways), then pools; the paper uses this for its
encoder-decoder experiments, where the original code did not mask padding (here it is masked).

Parameter tree (paths are "/"-joined; the SLM keeps its Hugging Face names, the decoder layer its own):

    bert/...                        the encoder (albert/..., deberta/..., roberta/..., electra/...)
    pifi/w_in/kernel                [d_s, d_llm]
    pifi/llm_layer/...              e.g. pifi/llm_layer/self_attn/q_proj/kernel (frozen, bf16)
    pifi/w_out/kernel               [d_llm, d_s]
    head/dense/{kernel, bias}       [d_s, d_s]
    head/out_proj/{kernel, bias}    [d_s, num_labels]

`FROZEN_RULES` freezes `pifi/llm_layer/` and trains everything else; the trainer then gives the
layer no gradient buffer and no optimizer state, and does not checkpoint it.

With a PEFT method (`build(..., peft=LoraConfig(...))`) the SLM is built with that method's leaves
and only they train in it: `module.trainable_rules(params)` trains the SLM's PEFT leaves (its
`modules_to_save` too), W_in, W_out and the head, and freezes the rest of the SLM and the layer.
Prompt tuning puts P soft tokens in front, so "cls" pooling reads the first of them, as Hugging
Face PEFT's classification heads do; it needs pooling "cls" and mode "token".

Extractive QA (`build(..., task="question_answering")`, PifiSpanModel): a span needs a vector per
token, so the layer always runs over the whole sequence (mode "sequence": padding masked, RoPE
positions 0..length-1, attention both ways) and `qa_outputs` (d_s -> 2, as transformers' QA heads)
reads every token of W_out's output:

    h = SLM(...); h = W_out LLMLayer(W_in h); start, end = qa_outputs(h)   # [batch, length] each

The other choice, the pooled token through the layer and added back to every token, gives each
token the same shift and so cannot move a span; it is not offered. Its baseline (method "base") is
the SLM with `qa_outputs`: the architecture of `from_pretrained(..., task="question_answering")`.

Decoder SLMs (SmolLM2, Qwen2, Llama: `build("asset:smollm2", llm, ...)`): classification pools
the last real token (pooling "last"; "cls" would read a token that sees only itself), the
sequence mode runs the layer causally at the mask's positions; `task="causal_lm"`
(PifiCausalLM) puts the layer between the SLM's last hidden state and its LM head, causal, and
generates with a cache of its own beside the SLM's. Encoder-decoder SLMs (T5, BART,
`task="seq2seq"`, PifiSeq2Seq): the layer runs over the encoder states (both ways, padding
masked), and the decoder attends to W_out's output; generation computes it once.

    module, params = pifi_jax.pifi.build("asset:minilm", "asset:smollm2", -1, num_labels=2)
    logits = module.apply({"params": params}, input_ids, attention_mask, token_type_ids)
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, ClassVar

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from pifi_jax import parallel
from pifi_jax import peft as peft_lib
from pifi_jax.hub.layer import load_layer
from pifi_jax.hub.pretrained import from_pretrained, open_checkpoint
from pifi_jax.layers import KVCache, Linear, activation
from pifi_jax.models import registry
from pifi_jax.models.stack import last_token_index

METHODS = ("pifi", "base")
POOLINGS = ("cls", "mean", "last")
MODES = ("token", "sequence")
TASKS = ("classification", "question_answering", "causal_lm", "seq2seq")
# The frozen layer; everything else (SLM, W_in, W_out, head) trains.
FROZEN_RULES = ((r"pifi/llm_layer/.*", "frozen"), (r".*", "trainable"))
# PyTorch's nn.Linear initialisation (uniform in +-1/sqrt(fan_in)), which the paper's new layers had.
_TORCH_LINEAR_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class PifiHead(nn.Module):
    """dense -> Dropout -> GELU -> out_proj (dropout before the activation, as in the paper)."""

    hidden_size: int
    num_labels: int
    dropout_rate: float = 0.2
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        kw = dict(dtype=self.dtype, kernel_init=_TORCH_LINEAR_INIT)
        x = Linear(self.hidden_size, **kw, name="dense")(x)  # [batch, d_s]
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        x = activation("gelu")(x)  # exact (erf) GELU, PyTorch's nn.GELU()
        return Linear(self.num_labels, **kw, name="out_proj")(x)  # [batch, num_labels]


class PifiPlugin(nn.Module):
    """W_in -> frozen decoder layer (non-causal) -> W_out on [batch, length, d_s] -> same shape.

    llm_layer: a decoder layer module as `pifi_jax.load_layer` returns it; its parameters live
    under `llm_layer/` here.
    """

    llm_layer: nn.Module
    slm_hidden_size: int
    dtype: Any = jnp.float32
    zero_out: bool = False  # W_out starts at zero (a residual plug-in starts as the identity)

    @nn.compact
    def __call__(
        self, x, attention_mask, positions, deterministic: bool = True, *, causal=False, cache=None
    ):
        """x [batch, length, d_s] -> [batch, length, d_s]. positions None: from the mask (or the
        cache). causal: a decoder SLM's states (each token sees those before it). cache: the
        layer's own KVCache (generation); then the result is (output, updated cache)."""
        kw = dict(use_bias=False, dtype=self.dtype)
        llm_hidden = self.llm_layer.config.hidden_size
        x = Linear(llm_hidden, **kw, kernel_init=_TORCH_LINEAR_INIT, name="w_in")(x)
        y = self.llm_layer(
            x,
            attention_mask=attention_mask,
            positions=positions,
            causal=causal,
            deterministic=deterministic,
            cache=cache,
        )  # [batch, length, d_llm]
        if cache is not None:
            y, cache = y
        out_init = nn.initializers.zeros if self.zero_out else _TORCH_LINEAR_INIT
        z = Linear(self.slm_hidden_size, **kw, kernel_init=out_init, name="w_out")(
            y.astype(self.dtype)
        )
        return z if cache is None else (z, cache)


def pool(hidden: jax.Array, attention_mask: jax.Array, pooling: str) -> jax.Array:
    """[batch, length, d] -> [batch, d]: the first token ("cls"), the masked mean ("mean") or
    each row's last real token ("last", a decoder's; soft-prompt slots in front, if hidden is
    longer than the mask, are skipped)."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        length = attention_mask.shape[1]
        last = last_token_index(attention_mask, length) + (hidden.shape[1] - length)  # [batch]
        return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    mask = attention_mask.astype(hidden.dtype)[:, :, None]  # [batch, length, 1]
    return jnp.sum(hidden * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)


class _PifiParts:
    """What the PiFi models share: the encoder's config, the method, the SLM's PEFT config, the
    partition rules and the logical axes. `head_name`: the top-level name of the task head."""

    head_name: ClassVar[str | None] = "head"

    @property
    def slm_is_decoder(self) -> bool:
        """A decoder SLM (its bare stack, or its causal LM), not an encoder."""
        return self.encoder.task in ("decoder", "causal_lm")

    @property
    def config(self):
        """The encoder's config (the SLM decides tokenizer, inputs and model type)."""
        return self.encoder.config

    @property
    def method(self) -> str:
        return "base" if self.pifi is None else "pifi"

    @property
    def peft_config(self):
        """The SLM's PEFT config, or None when the SLM is fully fine-tuned."""
        return getattr(self.encoder, "peft_config", None)

    def refuse_prompt_tuning(self, what: str) -> None:
        """Refuses prompt tuning on the SLM when the layer runs over every token (`what` runs
        it so): the soft tokens would join the plugged sequence unmasked."""
        method = self.peft_config.method if self.peft_config is not None else None
        if method == "prompt" and self.pifi is not None:
            raise ValueError(
                f"{what} runs the layer over every token, which prompt tuning's soft tokens "
                "would join unmasked: use another PEFT method (or method 'base')"
            )

    def trainable_rules(self, params: dict) -> list[tuple[str, str]]:
        """Partition rules: the layer frozen; W_in, W_out and the head trained; the SLM fully
        trained, or, with a PEFT method, only its PEFT leaves (and its modules_to_save)."""
        if self.peft_config is None:
            return list(FROZEN_RULES)
        own = ("pifi",) if self.head_name is None else ("pifi", self.head_name)
        encoder_params = {k: v for k, v in params.items() if k not in own}
        return [
            FROZEN_RULES[0],
            (rf"({'|'.join(own)})/.*", "trainable"),
            *peft_lib.trainable_rules(self.encoder, encoder_params),
        ]

    @property
    def param_axes(self) -> tuple:
        """Logical axes of the whole tree: the decoder family's rules under pifi/llm_layer/, then
        the encoder family's. W_in, W_out and the head are small and stay replicated."""
        axes = []
        if self.pifi is not None:
            llm = registry.family_for(self.pifi.llm_layer.config.model_type)
            # The family's layer rules are written to match a layer's paths with any prefix.
            axes += [("pifi/llm_layer/" + pattern, names) for pattern, names in llm.PARAM_AXES]
        return tuple(axes) + tuple(registry.family_for(self.config.model_type).PARAM_AXES)


class PifiClassifier(_PifiParts, nn.Module):
    """SLM -> pooling -> [PiFi plug-in] -> head. Logits [batch, num_labels] in float32.

    encoder: a bare encoder (`from_pretrained(path, task="encoder")`); it shares this module's
    scope, so its parameters keep their Hugging Face paths (`bert/...`) at the top of the tree.
    pifi: the plug-in, or None for the paper's baseline (method "base").
    """

    task: ClassVar[str] = "classification"
    encoder: nn.Module
    num_labels: int
    pifi: PifiPlugin | None = None
    pooling: str = "cls"
    mode: str = "token"
    head_dropout: float = 0.2
    dtype: Any = jnp.float32

    def setup(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling {self.pooling!r} is not one of {POOLINGS}")
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {MODES}")
        if self.slm_is_decoder and self.pooling == "cls":
            raise ValueError(
                "pifi.pooling='cls' reads a decoder SLM's first token, which sees only itself: "
                "use 'last' (the last real token, as decoders classify) or 'mean'"
            )
        method = self.peft_config.method if self.peft_config is not None else None
        first = "last" if self.slm_is_decoder else "cls"
        if method == "prompt" and (self.pooling, self.mode) != (first, "token"):
            raise ValueError(
                f"PiFi with prompt tuning needs pooling={first!r} and mode='token': the soft "
                "prompt makes the SLM's output longer than the mask (got "
                f"pooling={self.pooling!r}, mode={self.mode!r})"
            )
        nn.share_scope(self, self.encoder)
        self.head = PifiHead(
            self.encoder.config.hidden_size, self.num_labels, self.head_dropout, self.dtype
        )

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, deterministic=True):
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        batch, length = input_ids.shape
        if self.slm_is_decoder:  # no segment embedding; positions from the mask
            h = self.encoder(input_ids, attention_mask, deterministic=deterministic)
        else:
            h = self.encoder(input_ids, attention_mask, token_type_ids, deterministic=deterministic)
        if self.pifi is not None and self.mode == "sequence":
            if self.slm_is_decoder:  # causal, as the SLM's own layers; positions from the mask
                h = self.pifi(h, attention_mask, None, deterministic, causal=True)
            else:
                positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
                h = self.pifi(h, attention_mask, positions, deterministic)  # [batch, length, d_s]
        pooled = pool(h, attention_mask, self.pooling)  # [batch, d_s]
        if self.pifi is not None and self.mode == "token":
            # One token at position 0: RoPE is the identity and the mask a no-op.
            one = jnp.ones((batch, 1), jnp.int32)
            pooled = self.pifi(pooled[:, None], one, 0 * one, deterministic)[:, 0]
        return self.head(pooled, deterministic).astype(jnp.float32)


class PifiSpanModel(_PifiParts, nn.Module):
    """SLM -> [PiFi plug-in over every token] -> qa_outputs: start and end logits [batch, length]
    in float32 (extractive QA; the module docstring says why every token).

    encoder: a bare encoder (`from_pretrained(path, task="encoder")`), sharing this scope.
    pifi: the plug-in, or None for the baseline.
    """

    task: ClassVar[str] = "question_answering"
    head_name: ClassVar[str] = "qa_outputs"
    encoder: nn.Module
    pifi: PifiPlugin | None = None
    dtype: Any = jnp.float32

    def setup(self):
        self.refuse_prompt_tuning("PiFi for extractive QA")
        if self.slm_is_decoder:
            raise ValueError("PiFi for extractive QA needs an encoder SLM, not a decoder")
        nn.share_scope(self, self.encoder)
        self.qa_outputs = Linear(2, dtype=self.dtype, name="qa_outputs")

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, deterministic=True):
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        h = self.encoder(input_ids, attention_mask, token_type_ids, deterministic=deterministic)
        if self.pifi is not None:
            batch, length = input_ids.shape
            positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
            h = self.pifi(h, attention_mask, positions, deterministic)  # [batch, length, d_s]
        logits = self.qa_outputs(h).astype(jnp.float32)  # [batch, length, 2]
        return logits[..., 0], logits[..., 1]


@flax.struct.dataclass
class PifiCache:
    """What PiFi's causal LM keeps between generation steps: the SLM stack's KVCache and the
    plugged layer's own (its heads and width are the LLM's). Beam search reorders both alike."""

    slm: KVCache
    layer: KVCache

    def take_rows(self, rows: jax.Array) -> PifiCache:
        return PifiCache(self.slm.take_rows(rows), self.layer.take_rows(rows))

    def reorder_beams(self, rows: jax.Array, shared_slots: int) -> PifiCache:
        return PifiCache(
            self.slm.reorder_beams(rows, shared_slots),
            self.layer.reorder_beams(rows, shared_slots),
        )


class PifiCausalLM(_PifiParts, nn.Module):
    """A decoder SLM with the plug-in between its last hidden state and its LM head:

        h = SLM(input_ids)                       # last hidden state, after the final norm
        z = W_out LLMLayer(W_in h)               # causal, positions of the sequence, padding masked
        logits = lm_head(h + z)                  # residual=True (W_out starts at zero)
        logits = lm_head(z)                      # residual=False (the classifier's replacement)

    With `residual` (the default) the model starts as the pretrained SLM and the layer's share
    grows as W_out trains; without it the LM head first sees a random projection of the layer's
    output, as a new classification head would. Method "base" (pifi None) is the SLM alone.

    encoder: the SLM's causal LM (`from_pretrained(path, task="causal_lm")`), sharing this scope
    (its paths `model/...`, `lm_head/...` stay at the top). Call and cache as stack.CausalLM's:
    `cache=` takes the PifiCache of `init_cache` (the SLM's plain KVCache for method "base").
    """

    task: ClassVar[str] = "causal_lm"
    head_name: ClassVar[str | None] = None
    encoder: nn.Module
    pifi: PifiPlugin | None = None
    residual: bool = True
    dtype: Any = jnp.float32

    def setup(self):
        self.refuse_prompt_tuning("PiFi's causal LM")
        nn.share_scope(self, self.encoder)

    def init_cache(self, batch: int, max_length: int, dtype=jnp.float32):
        """An empty cache of `max_length` slots for generation (pifi_jax.generate)."""
        cfg = self.config
        slm = KVCache.create(
            batch, max_length, cfg.cache_kv_heads, cfg.head_dim, layers=cfg.num_layers, dtype=dtype
        )
        if self.pifi is None:
            return slm
        llm = self.pifi.llm_layer.config
        layer = KVCache.create(batch, max_length, llm.cache_kv_heads, llm.head_dim, dtype=dtype)
        return PifiCache(slm, layer)

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        positions=None,
        *,
        deterministic=True,
        cache=None,
        last_logits_only=False,
    ):
        kw = dict(deterministic=deterministic)
        if self.pifi is None:
            return self.encoder(
                input_ids, attention_mask, positions, cache=cache,
                last_logits_only=last_logits_only, **kw,
            )  # fmt: skip
        slm_cache = None if cache is None else cache.slm
        h = self.encoder(
            input_ids, attention_mask, positions, cache=slm_cache, output_hidden=True, **kw
        )  # [batch, length, d_s]
        if cache is not None:
            h, slm_cache = h
        # Positions: the given ones (packed rows), else from the mask or the layer's cache, so
        # the layer numbers tokens as the SLM does (a PEFT prefix in the SLM is not counted).
        z = self.pifi(
            h,
            attention_mask,
            positions,
            deterministic,
            causal=True,
            cache=None if cache is None else cache.layer,
        )
        if cache is not None:
            z, layer_cache = z
        h = h + z if self.residual else z
        logits = self.encoder(None, hidden=h, last_logits_only=last_logits_only, **kw)
        return logits if cache is None else (logits, PifiCache(slm_cache, layer_cache))


class PifiSeq2Seq(_PifiParts, nn.Module):
    """An encoder-decoder SLM (T5, BART) with the plug-in on its encoder states, which become the
    decoder's cross-attention memory (the paper's generation setting):

        e = SLM.encoder(input_ids)                                    # [batch, source, d_s]
        m = W_out LLMLayer(W_in e)    # residual=False (paper); e + W_out ... with residual=True
        logits = SLM.decoder(decoder_input_ids, memory=m, source padding mask)

    The layer runs over the whole source, attention both ways, RoPE at positions 0..S-1, padding
    masked (the original code did not mask it). The call is the encoder-decoder contract of
    models/t5.py: without decoder inputs it returns m, the plugged memory, so pifi_jax.generate
    computes it once and decodes from it with the SLM's own Seq2SeqCache.
    """

    task: ClassVar[str] = "seq2seq"
    is_encoder_decoder: ClassVar[bool] = True
    head_name: ClassVar[str | None] = None
    # The SLM (from_pretrained(path, task="seq2seq")), sharing this scope; not a field named
    # `encoder` as in the other PiFi models, since T5 names its own encoder stack so.
    slm: nn.Module
    pifi: PifiPlugin | None = None
    residual: bool = False
    dtype: Any = jnp.float32

    @property
    def encoder(self) -> nn.Module:
        """The SLM (the name the other PiFi models give it)."""
        return self.slm

    def setup(self):
        # (prefix and prompt tuning, whose virtual tokens the plugged sequence would lack, are
        # not offered for T5 and BART by pifi_jax.peft)
        nn.share_scope(self, self.slm)

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        decoder_input_ids=None,
        decoder_attention_mask=None,
        *,
        encoder_hidden=None,
        cache=None,
        deterministic=True,
    ):
        if encoder_hidden is None and input_ids is not None:
            if attention_mask is None:
                attention_mask = jnp.ones_like(input_ids)
            encoder_hidden = self.slm(input_ids, attention_mask, deterministic=deterministic)
            if self.pifi is not None:
                batch, length = input_ids.shape
                positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
                z = self.pifi(encoder_hidden, attention_mask, positions, deterministic)
                encoder_hidden = encoder_hidden + z if self.residual else z
        if decoder_input_ids is None:
            if encoder_hidden is None:
                raise ValueError("give input_ids (the source) or decoder_input_ids")
            return encoder_hidden  # [batch, source, d_s]
        return self.slm(
            None,
            attention_mask,
            decoder_input_ids,
            decoder_attention_mask,
            encoder_hidden=encoder_hidden,
            cache=cache,
            deterministic=deterministic,
        )


def slm_kind(slm_path: str | os.PathLike) -> str:
    """What the SLM is: "decoder" (a decoder family: Llama, Qwen2, SmolLM2, ...), "seq2seq" (an
    encoder-decoder: T5, BART) or "encoder". Only the config (or a GGUF header) is read."""
    _, hf_config = open_checkpoint(slm_path)
    family = registry.family_for(hf_config.get("model_type"))
    if hasattr(family, "decoder_layer"):
        return "decoder"
    return "seq2seq" if getattr(family, "ENCODER_DECODER", False) else "encoder"


def build(
    slm_path: str | os.PathLike,
    llm_path: str | os.PathLike | None,
    layer_index: int = -1,
    num_labels: int = 2,
    *,
    task: str = "classification",
    method: str = "pifi",
    pooling: str | None = None,
    mode: str = "token",
    residual: bool | None = None,
    head_dropout: float = 0.2,
    dtype: Any = jnp.float32,
    layer_dtype: Any = jnp.bfloat16,
    mesh: jax.sharding.Mesh | None = None,
    logical_axis_rules=parallel.DEFAULT_RULES,
    seed: int = 0,
    peft=None,
    log=print,
) -> tuple[PifiClassifier | PifiSpanModel | PifiCausalLM, dict]:
    """The PiFi model (or its baseline) with the SLM and the LLM layer loaded.

    Args:
      slm_path: the small model (directory, hub id, `asset:minilm`): an encoder, or a decoder
        (`asset:smollm2`, a Qwen2 / Llama checkpoint) for classification on its last real token
        and for causal generation; its pretrained classification head, if any, is not used.
      llm_path: the LLM (directory, hub id, GGUF file, `asset:smollm2`); only the tensors of layer
        `layer_index` are read. Unused for method "base".
      layer_index: the layer to plug in; negative counts from the end (-1 = last, the paper's).
      task: "classification" (PifiClassifier), "question_answering" (PifiSpanModel, encoders:
        start and end logits; the layer runs over every token, so `mode` must be "sequence", and
        num_labels, pooling and head_dropout do not apply) or "causal_lm" (PifiCausalLM, decoder
        SLMs: the layer between the SLM's last hidden state and its LM head, causal).
      method: "pifi" or "base" (no W_in / layer / W_out).
      pooling: "cls" (paper), "mean" or "last" (the last real token); None: "cls" for an encoder,
        "last" for a decoder. mode: "token" (paper: the layer sees one pooled token) or
        "sequence" (the layer runs over the whole sequence, causal for a decoder, then pooling).
      residual: the generative tasks: the plugged states are h + W_out LLMLayer(W_in h), W_out
        starting at zero (True), or W_out LLMLayer(W_in h) alone (False); None: True for
        causal_lm (PifiCausalLM), False for seq2seq (PifiSeq2Seq, the paper's).
      dtype: computation dtype of everything; layer_dtype: storage dtype of the frozen layer.
      seed: initialises W_in, W_out and the head (and the PEFT leaves).
      peft: a pifi_jax.peft config (LoraConfig, ...) for the SLM, or None (fully fine-tuned).
    Returns:
      (module, params): `module.apply({"params": params}, input_ids, attention_mask,
      token_type_ids, deterministic=True)` -> logits [batch, num_labels] (causal_lm:
      `module.apply({"params": params}, input_ids, attention_mask)` -> [batch, length, vocab];
      pifi_jax.generate takes the module as it takes a causal LM).
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {METHODS}")
    if task not in TASKS:
        raise ValueError(f"PiFi task {task!r} is not one of {TASKS}")
    if task == "question_answering" and mode != "sequence":
        raise ValueError(
            f"PiFi for extractive QA runs the layer over every token: set pifi.mode='sequence' "
            f"(got {mode!r})"
        )
    kind = slm_kind(slm_path)
    if task == "causal_lm" and kind != "decoder":
        raise ValueError(
            f"PiFi's causal LM needs a decoder SLM (SmolLM2, Qwen2, Llama...); {slm_path} is "
            f"an {'encoder-decoder: use the seq2seq objective' if kind == 'seq2seq' else 'encoder'}"
        )
    if (task == "seq2seq") != (kind == "seq2seq"):
        raise ValueError(
            f"PiFi with an encoder-decoder SLM (T5, BART) is for the seq2seq objective: SLM "
            f"{slm_path} is a{'n encoder-decoder' if kind == 'seq2seq' else ' ' + kind}, the "
            f"task is {task!r}"
        )
    if pooling is None:
        pooling = "last" if kind == "decoder" else "cls"
    if residual is None:  # seq2seq: the paper's replacement of the memory
        residual = task == "causal_lm"
    # The SLM's module: its bare stack (classification, QA) or its generative model.
    slm_task = task if task in ("causal_lm", "seq2seq") else kind
    kw = dict(mesh=mesh, logical_axis_rules=logical_axis_rules)
    encoder, params = from_pretrained(
        slm_path, task=slm_task, dtype=dtype, seed=seed, peft=peft, log=log, **kw
    )
    plugin = None
    if method == "pifi":
        if llm_path is None:
            raise ValueError('method "pifi" needs llm_path')
        layer, layer_params = load_layer(
            llm_path, layer_index, dtype=dtype, param_dtype=layer_dtype, **kw
        )
        zero_out = task in ("causal_lm", "seq2seq") and residual
        plugin = PifiPlugin(layer, _slm_width(encoder.config), dtype, zero_out)
        params = {**params, "pifi": {"llm_layer": layer_params}}
    if task == "question_answering":
        module = PifiSpanModel(encoder, plugin, dtype)
    elif task == "causal_lm":
        module = PifiCausalLM(encoder, plugin, residual, dtype)
    elif task == "seq2seq":
        module = PifiSeq2Seq(encoder, plugin, residual, dtype)
    else:
        module = PifiClassifier(encoder, num_labels, plugin, pooling, mode, head_dropout, dtype)
    return module, _init_new_leaves(module, params, seed)


def _slm_width(config) -> int:
    """The SLM's hidden width (T5 calls it d_model)."""
    return getattr(config, "hidden_size", None) or config.d_model


def _init_new_leaves(module: nn.Module, params: dict, seed: int) -> dict:
    """Creates W_in, W_out and the head by running the model once with the loaded leaves given:
    Linen returns a parameter that exists and initialises one that does not."""
    ids = jnp.zeros((1, 4), jnp.int32)

    def init(loaded):
        _, state = module.apply(
            {"params": loaded},
            ids,
            deterministic=True,
            mutable=["params"],
            rngs={"params": jax.random.PRNGKey(seed)},
        )
        return state["params"]

    return jax.jit(init)(params)


def layer_fingerprint(layer_params: dict) -> str:
    """sha256 over the layer's leaves (sorted paths, dtypes, shapes and bytes): what the layer is."""
    digest = hashlib.sha256()
    for path, leaf in sorted(traverse_util.flatten_dict(layer_params, sep="/").items()):
        if not leaf.is_fully_addressable:
            from jax.experimental import multihost_utils

            leaf = multihost_utils.process_allgather(leaf, tiled=True)
        array = np.ascontiguousarray(jax.device_get(leaf))
        digest.update(f"{path}:{array.dtype}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()
