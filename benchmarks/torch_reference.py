"""The PyTorch side of the benchmark suite: transformers + Hugging Face PEFT, eager or compiled.

`measure(case, variant, ...)` builds the reference model of a `common.Case` with random weights,
then times the usual PyTorch training step

    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cuda", torch.bfloat16):     # bf16 compute; master weights stay float32
        loss = loss_fn(model, batch)
    loss.backward()
    clip_grad_norm_(trainable, 1.0)
    optimizer.step()                                  # AdamW (fused on CUDA)

with `variant` "eager" (the model as is) or "compile" (`torch.compile(model)`: forward and backward
graphs compiled by Inductor on the first call, whose time is reported as the compile time).

Precision mirrors pifi_jax's trainer: trainable weights are float32 master weights, frozen weights
(the PEFT base model, PiFi's plugged layer, the Llama under LoRA) are stored in the compute dtype
(bf16 on a GPU), and matmuls run in the compute dtype. In float32 (the CPU smoke) autocast is off.

Models:
  full / lora / ia3   transformers.BertForSequenceClassification (+ peft.get_peft_model)
  pifi / base         TorchPifiClassifier: BertModel -> [CLS] -> W_in -> LlamaDecoderLayer (frozen)
                      -> W_out -> Linear -> Dropout(0.2) -> GELU -> Linear (shared/spec/pifi.md)
  causal_lora         transformers.LlamaForCausalLM with gradient checkpointing (non-reentrant) +
                      peft LoRA
"""

from __future__ import annotations

import contextlib
import math
import sys

import torch
import transformers
from torch import nn
from transformers.models.llama import modeling_llama

from benchmarks import common  # suite.py puts the repository root on sys.path

VARIANTS = ("eager", "compile")
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def _hf_kwargs(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "model_type"}


def bert_config(case: common.Case) -> transformers.BertConfig:
    config = transformers.BertConfig(**_hf_kwargs(case.encoder), num_labels=case.num_labels)
    config._attn_implementation = "sdpa"
    return config


def llama_config(config: dict) -> transformers.LlamaConfig:
    llama = transformers.LlamaConfig(**_hf_kwargs(config))
    llama._attn_implementation = "sdpa"
    return llama


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Parameters created inside are created in `dtype` (no float32 copy of a big model first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class TorchPifiClassifier(nn.Module):
    """PiFi's classifier (token mode, CLS pooling), or its baseline when `llama` is None.

    The plugged layer is a transformers LlamaDecoderLayer in `layer_dtype`, frozen; it sees one
    token at position 0 (RoPE is the identity there), as in the paper's code.
    """

    def __init__(self, bert: transformers.BertConfig, llama, num_labels: int, layer_dtype):
        super().__init__()
        hidden = bert.hidden_size
        self.bert = transformers.BertModel(bert, add_pooling_layer=False)
        self.plugged = llama is not None
        if self.plugged:
            self.w_in = nn.Linear(hidden, llama.hidden_size, bias=False)
            with default_dtype(layer_dtype):
                self.llm_layer = modeling_llama.LlamaDecoderLayer(
                    llama, llama.num_hidden_layers - 1
                )
            self.llm_layer.requires_grad_(False)
            self.rotary = modeling_llama.LlamaRotaryEmbedding(llama)
            self.w_out = nn.Linear(llama.hidden_size, hidden, bias=False)
        self.head = nn.Sequential(
            nn.Linear(hidden, hidden), nn.Dropout(0.2), nn.GELU(), nn.Linear(hidden, num_labels)
        )

    def forward(self, input_ids, attention_mask, token_type_ids):
        h = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state  # [batch, length, d_s]
        pooled = h[:, 0]  # [batch, d_s]
        if self.plugged:
            x = self.w_in(pooled)[:, None]  # [batch, 1, d_llm]
            positions = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)
            y = self.llm_layer(
                x,
                attention_mask=None,
                position_ids=positions,
                position_embeddings=self.rotary(x, positions),
            )  # [batch, 1, d_llm]
            pooled = self.w_out(y[:, 0])  # [batch, d_s]
        return self.head(pooled)  # [batch, num_labels]


def _peft_config(case: common.Case):
    import peft

    spec = dict(case.peft)
    method = spec.pop("method")
    task_type = "CAUSAL_LM" if case.method == "causal_lora" else "SEQ_CLS"
    if method == "lora":
        return peft.LoraConfig(task_type=task_type, lora_dropout=0.0, **spec)
    if method == "ia3":
        return peft.IA3Config(task_type=task_type, **spec)
    raise ValueError(f"no PyTorch reference for PEFT method {method!r}")


def build(case: common.Case, dtype: torch.dtype, device: torch.device):
    """(model, loss_fn(model, batch) -> scalar loss) of a case, on `device`.

    Trainable parameters end in float32, frozen ones in `dtype`.
    """
    if case.method in ("full", "lora", "ia3"):
        model = transformers.BertForSequenceClassification(bert_config(case))
        if case.method != "full":
            import peft

            model = peft.get_peft_model(model.to(dtype), _peft_config(case))
    elif case.method in ("pifi", "base"):
        llama = llama_config(case.decoder) if case.method == "pifi" else None
        model = TorchPifiClassifier(bert_config(case), llama, case.num_labels, dtype)
    elif case.method == "causal_lora":
        import peft

        with default_dtype(dtype), torch.device(device):
            model = transformers.LlamaForCausalLM(llama_config(case.decoder))
        if case.remat:  # non-reentrant checkpointing of every layer (the renamed API if present)
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable({"use_reentrant": False})
        model = peft.get_peft_model(model, _peft_config(case))
    else:
        raise ValueError(f"unknown case method {case.method!r}")
    model.to(device)
    for p in model.parameters():  # float32 master weights for what trains
        if p.requires_grad:
            p.data = p.data.float()
    model.train()

    if case.method == "causal_lora":

        def loss_fn(m, batch):
            ids = batch["input_ids"]
            return m(input_ids=ids, attention_mask=batch["attention_mask"], labels=ids).loss

    else:

        def loss_fn(m, batch):
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
            out = m(**inputs)
            logits = out if isinstance(out, torch.Tensor) else out.logits
            return nn.functional.cross_entropy(logits.float(), batch["labels"])

    return model, loss_fn


def _param_groups(model: nn.Module) -> list[dict]:
    """Trainable parameters in two AdamW groups: with and without weight decay (biases and
    LayerNorm weights, as pifi_jax's default `no_decay`)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
    return [
        {"params": decay, "weight_decay": common.WEIGHT_DECAY},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def measure(
    case: common.Case,
    variant: str,
    *,
    steps: int,
    warmup: int,
    dtype: str,
    require_cuda: bool,
) -> dict:
    """Builds the case, times its training step; returns the measurement as a JSON-able dict.

    require_cuda: refuse to run on the CPU (a full-size case there would take hours and say
    nothing about the GPU comparison).
    """
    cuda = torch.cuda.is_available()
    if require_cuda and not cuda:
        raise RuntimeError(
            f"torch {torch.__version__} sees no CUDA device: the full-size PyTorch reference needs "
            "a CUDA build of torch on the GPU machine (pip install torch --index-url "
            "https://download.pytorch.org/whl/cu124, or run with --smoke on the CPU)"
        )
    device = torch.device("cuda" if cuda else "cpu")
    threads = torch.get_num_threads()
    if not cuda and "jax" in sys.modules:
        # Sharing the CPU with XLA's thread pool in one process, PyTorch's OpenMP threads spin
        # against it and a step takes 100x longer; one thread avoids that (the in-process smoke).
        torch.set_num_threads(1)
    try:
        return _measure(case, variant, steps=steps, warmup=warmup, dtype=dtype, device=device)
    finally:
        torch.set_num_threads(threads)


def prepare_step(case: common.Case, variant: str, *, dtype: str, device: torch.device):
    """(step, sync, info) of a case: `step()` runs one training step and returns its loss,
    `sync(loss)` waits for the device; info: parameter counts. The first call of a "compile"
    step compiles."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is not one of {VARIANTS}")
    cuda = device.type == "cuda"
    compute = _DTYPES[dtype]
    if cuda:
        torch.set_float32_matmul_precision("high")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)

    model, loss_fn = build(case, compute, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        _param_groups(model), lr=common.LEARNING_RATE, fused=cuda if cuda else None
    )
    forward = torch.compile(model) if variant == "compile" else model
    batch = {
        k: torch.as_tensor(v, dtype=torch.long).to(device)
        for k, v in common.synthetic_batch(case).items()
    }
    amp = compute != torch.float32

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=compute, enabled=amp):
            loss = loss_fn(forward, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, common.CLIP_NORM)
        optimizer.step()
        return loss

    def sync(_):
        if cuda:
            torch.cuda.synchronize()

    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in model.parameters())
    info = {"trainable_params": n_trainable, "frozen_params": n_total - n_trainable}
    return step, sync, info


def _measure(case, variant, *, steps, warmup, dtype, device) -> dict:
    cuda = device.type == "cuda"
    step, sync, info = prepare_step(case, variant, dtype=dtype, device=device)
    losses = []

    def step_and_keep():
        loss = step()
        losses.append(loss)
        return loss

    timing = common.time_steps(step_and_keep, sync, warmup=warmup, steps=steps)
    final_loss = float(losses[-1].detach().float().cpu())
    if not math.isfinite(final_loss):
        raise FloatingPointError(f"{case.label} torch {variant}: the loss is {final_loss}")
    return {
        "framework": f"torch {variant}",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "step_s": timing.median_s,
        "times_s": timing.times,
        "first_s": timing.first_s,
        # Inductor compiles forward and backward during the first call.
        "compile_s": timing.first_s - timing.median_s if variant == "compile" else None,
        "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "peak_kind": "max_memory_allocated" if cuda else None,
        **info,
        "loss": final_loss,
    }
