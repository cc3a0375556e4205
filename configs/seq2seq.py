"""Fine-tune an encoder-decoder (T5, flan-T5, mT5, BART) on text pairs.

No T5 or BART weights install offline, so this config names hub models (it needs the network):
    python -m launch.train --config=configs/seq2seq.py:model=google-t5/t5-small,task=cnn_dailymail \
        --config.peft.method=lora --workdir=runs/cnn_t5_lora
    python -m launch.train --config=configs/seq2seq.py:model=facebook/bart-base,task=xsum \
        --config.peft.method=full
Local checkpoints and files work offline:
    python -m launch.train --config=configs/seq2seq.py:model=/path/to/t5,task=pairs \
        --config.data.data_files.train=train.csv --config.data.data_files.validation=dev.csv

The encoder reads `task.prompt` formatted over the source ("summarize: {source}" for summaries,
T5's prefix); the decoder learns the target behind the model's decoder start token, padding
ignored in the loss. Evaluation generates (greedy or beam search; encoder run once, decoder with a
self-attention and a cross-attention cache) and scores with ROUGE / BLEU.

The argument after the colon is comma-separated: `task=NAME`, `model=PATH_OR_HUB_ID`, and the flag
`runlocal` (a tiny, seconds-long setting used by the tests). Everything not set here is
configs/classify.py's.
"""

import ml_collections

from configs.causal_lm import DEFAULT_TASK, apply_runlocal, generation_section
from configs.classify import _parse
from configs.classify import get_config as classify_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = _parse(arg)
    config = classify_config()
    # A generation task from the registry (pifi_jax.data.TASKS), or "pairs" with local files.
    config.task = args.get("task", DEFAULT_TASK)
    # Encoder-decoder loss on the target tokens; evaluation by generation.
    config.objective = "seq2seq"
    # An encoder-decoder checkpoint directory or hub id (T5, flan-T5, mT5, BART).
    config.model.path = args.get("model", "google-t5/t5-small")

    # Source tokens at most (the tokenizer truncates, keeping its eos).
    config.data.max_length = 256
    # Target tokens at most, eos included; a longer target is refused with its file and row.
    config.data.max_target_length = 32
    # Static lengths of the sources, and separately of the targets.
    config.data.buckets = (64, 128, 256)
    config.data.target_buckets = (16, 32)
    # Format of the encoder input over {source}; empty = the task's `prompt`.
    config.data.prompt = ""

    # Decoding of the evaluation: max_new_tokens, greedy | beam, num_beams, length_penalty.
    config.generation = generation_section(max_new_tokens=32)

    # Global batch sizes of training and of evaluation (generation).
    config.train.batch_size = 8
    config.train.eval_batch_size = 16
    # Label smoothing is for classification.
    config.train.label_smoothing = 0.0
    config.train.eval_every_steps = 0
    config.train.log_every_steps = 5

    # Peak learning rate and warm-up share (LoRA takes a larger rate than full fine-tuning).
    config.optim.lr = 3e-4
    config.optim.warmup_ratio = 0.06
    # No weight decay on biases and norm scales (T5: layer_norm, final_layer_norm; BART too).
    config.optim.no_decay = ("bias$", "norm")

    # LoRA r 8, alpha 16 on the architecture's Hugging Face PEFT default targets (t5: q, v).
    config.peft.method = "lora"
    config.peft.r = 8
    config.peft.lora_alpha = 16.0

    if args.get("runlocal"):
        apply_runlocal(config)
    return config
