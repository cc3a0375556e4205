"""Tiny random transformers (PyTorch) models used as parity references. No download."""

from __future__ import annotations

import numpy as np

TINY = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    type_vocab_size=2,
)
# A tiny decoder (Llama, Mistral, Qwen2, ...): heads 4, kv heads 2 (grouped-query attention).
TINY_DECODER = dict(
    vocab_size=99,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.1,
)


def tiny_encoder(model_type: str, task: str = "classification", num_labels: int = 3, seed: int = 0):
    """A random transformers model of `model_type` ("bert", "roberta", "electra")."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg_cls = {
        "bert": transformers.BertConfig,
        "roberta": transformers.RobertaConfig,
        "electra": transformers.ElectraConfig,
    }[model_type]
    extra = {"embedding_size": 16} if model_type == "electra" else {}
    if model_type == "roberta":
        extra.update(pad_token_id=1, bos_token_id=0, eos_token_id=2)
    config = cfg_cls(**TINY, num_labels=num_labels, **extra)
    prefix = {"bert": "Bert", "roberta": "Roberta", "electra": "Electra"}[model_type]
    suffix = "ForSequenceClassification" if task == "classification" else "Model"
    model = getattr(transformers, prefix + suffix)(config)
    # Non-trivial LayerNorm and bias values, so a mapping error cannot hide behind ones and zeros.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def scale_up(model, weight_std: float = 0.2):
    """Weights ten times the usual init, so attention is far from uniform and every term (relative
    positions, talking heads, ...) moves the logits well beyond the tolerance; non-trivial
    LayerNorm and bias values, so a mapping error cannot hide behind ones and zeros."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, weight_std)
            else:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def padded_batch(
    batch: int = 3,
    length: int = 10,
    pair: bool = False,
    seed: int = 0,
    step: int = 2,
    pad_id: int = 0,
):
    """input_ids / attention_mask / token_type_ids, right-padded: row b has `length - step*b`
    real tokens (the second half of them type 1 when `pair`)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 99, size=(batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    types = np.zeros((batch, length), np.int32)
    for b in range(batch):
        real = length - step * b
        mask[b, real:] = 0
        ids[b, real:] = pad_id
        if pair:
            types[b, real // 2 : real] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def random_batch(
    model_type: str, batch: int = 3, length: int = 10, pair: bool = False, seed: int = 0
):
    """padded_batch with the family's padding id (RoBERTa pads with 1)."""
    pad = 1 if model_type == "roberta" else 0
    return padded_batch(batch, length, pair, seed, step=2, pad_id=pad)


def torch_logits(model, batch) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(**{k: torch.as_tensor(v, dtype=torch.long) for k, v in batch.items()})
    value = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return value.numpy()
