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

from configs.causal_lm import DEFAULT_TASK, apply_runlocal, generative_defaults
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
    config.data.max_target_length = 64
    # Static lengths of the sources, and separately of the targets.
    config.data.buckets = (64, 128, 256)
    config.data.target_buckets = (16, 32, 64)
    # Format of the encoder input over {source}; empty = the task's `prompt`.
    config.data.prompt = ""

    generative_defaults(config, lr=3e-4)

    if args.get("runlocal"):
        apply_runlocal(config)
    return config
