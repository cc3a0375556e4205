r"""PiFi (Kim et al., ACL 2025): fine-tune a small encoder with one frozen LLM layer plugged in.

Offline default (MiniLM + the last layer of SmolLM2-135M, Rotten Tomatoes, CPU):
    python -m launch.train --config=configs/pifi.py
    # README's main job: base and PiFi, one epoch each, test accuracy side by side
    python -m launch.experiments --config=configs/pifi.py --config.train.epochs=1

The paper's setting (hub names need the network; the LLM layer is read alone from its shard):
    python -m launch.train --config=configs/pifi.py:task=sst2,slm=bert,llm=llama3.1,method=pifi
    python -m launch.train --config=configs/pifi.py:task=sst2,slm=bert,method=base
Extractive QA (a span task: the layer runs over every token, see pifi_jax.pifi.plugin):
    python -m launch.train --config=configs/pifi.py:task=squad_spans,llm=qwen2.5-coder-1.5b
A decoder SLM: classification on its last real token, or causal generation with the layer
between its last hidden state and its LM head (a generation task: configs/causal_lm.py's
settings, LoRA on the SLM):
    python -m launch.train --config=configs/pifi.py:task=rt,slm=smollm2,llm=qwen2.5-coder-1.5b
    python -m launch.train --config=configs/pifi.py:task=sciq_question,llm=qwen2.5-coder-1.5b
The paper's generation tasks (an encoder-decoder SLM: the layer over the encoder states, which
the decoder attends to; configs/seq2seq.py's data settings, the whole SLM fine-tuned):
    python -m launch.train --config=configs/pifi.py:task=multi30k,slm=t5,llm=llama3.1   # BLEU
    python -m launch.train --config=configs/pifi.py:task=cnn_dailymail,slm=bart,llm=llama3.1
    python -m launch.train --config=configs/pifi.py:task=pairs,slm=/path/to/t5,seq2seq \
        --config.data.data_files.train=train.csv --config.data.data_files.validation=dev.csv

Another layer, or the one automatic selection picks (pifi_jax.pifi.select) before training:
    python -m launch.train --config=configs/pifi.py:task=rt --config.pifi.layer=3
    python -m launch.train --config=configs/pifi.py:task=rt --config.pifi.layer=auto
Any local encoder or LLM directory works in place of a short name (slm=/path, llm=/path).

The argument after the colon is comma-separated: `task=NAME`, `slm=NAME_OR_PATH` (bert, roberta,
albert, electra, deberta, debertav3, minilm; decoders smollm2, qwen2.5-coder-0.5b; encoder-decoders
t5, bart; a generation task's default is smollm2, or t5 with `seq2seq`), `llm=NAME_OR_PATH` (llama3.1, llama3, llama2,
mistral0.1, mistral0.3, qwen2_0.5b, qwen2_1.5b, qwen2_7b, qwen2_72b, gemma2, falcon, smollm2,
qwen2.5-coder-0.5b, qwen2.5-coder-1.5b),
`method=pifi|base`, the flag `seq2seq` (an encoder-decoder SLM given by path) and the flag
`runlocal` (a tiny, seconds-long setting used by the tests).
The default run directory is runs/<task>_<slm>_<method>[_<llm>_L<layer>].

Everything not set here is configs/classify.py's (data, checkpoints, mesh, ...), or for a
generation task configs/causal_lm.py's; the fields below are the paper's hyperparameters
(shared/spec/pifi.md, classification and QA) and the `pifi` section.
"""

import ml_collections

from configs.causal_lm import apply_runlocal as causal_runlocal
from configs.causal_lm import get_config as causal_lm_config
from configs.classify import _parse
from configs.classify import get_config as classify_config
from configs.qa import qa_data_defaults
from configs.seq2seq import get_config as seq2seq_config
from pifi_jax.data import get_task
from pifi_jax.pifi.names import DECODER_SLMS, ENCODER_DECODER_SLMS, resolve_llm, resolve_slm
from pifi_jax.pifi.plugin import FROZEN_RULES

_ARGS = ("task", "slm", "llm", "method", "seq2seq", "runlocal")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = _parse(arg, _ARGS)
    task = args.get("task", "rt")
    generation = get_task(task).kind == "generation"
    default_slm = ("t5" if args.get("seq2seq") else "smollm2") if generation else "minilm"
    slm = args.get("slm", default_slm)
    seq2seq = generation and (bool(args.get("seq2seq")) or slm in ENCODER_DECODER_SLMS)
    # A generation task takes configs/seq2seq.py's (an encoder-decoder SLM) or
    # configs/causal_lm.py's data and decoding settings; the others configs/classify.py's. The
    # paper's hyperparameters below apply to all but the causal LM (not in the paper: LoRA r 8
    # on the SLM, configs/causal_lm.py's optimiser).
    if seq2seq:
        config = seq2seq_config()
    else:
        config = causal_lm_config() if generation else classify_config()
    # Task name from the registry (pifi_jax.data.TASKS); "rt" = offline Rotten Tomatoes.
    config.task = task
    # The paper's seed.
    config.seed = 2023
    # The SLM: a short name (see the docstring) resolved to its checkpoint, or a path.
    config.model.path = resolve_slm(slm)

    # The model builder the trainer looks up (pifi_jax.train.builders): PiFi's own.
    config.builder = "pifi"

    config.pifi = ml_collections.ConfigDict()
    # "pifi" (SLM -> W_in -> frozen LLM layer -> W_out -> head) or "base" (SLM -> head).
    config.pifi.method = args.get("method", "pifi")
    # The LLM whose layer is plugged in: a short name resolved to its checkpoint, or a path/GGUF.
    config.pifi.llm = resolve_llm(args.get("llm", "smollm2"))
    # Layer index (-1 = last, the paper's choice) or "auto" (automatic selection before training).
    config.pifi.layer = "-1"
    # Pooling of the SLM output: "cls" (paper), "mean" (over the attention mask) or "last" (the
    # last real token: a decoder SLM's, set for the decoder short names).
    config.pifi.pooling = "last" if slm in DECODER_SLMS else "cls"
    # "token": the layer sees the pooled vector as one token (paper, classification);
    # "sequence": the layer runs over the whole sequence (padding masked, RoPE), then pooling.
    config.pifi.mode = "token"
    # Dropout of the head (dense -> dropout -> GELU -> out_proj).
    config.pifi.head_dropout = 0.2
    # Storage dtype of the frozen layer (computation follows model.dtype).
    config.pifi.layer_dtype = "bfloat16"
    # Layer selection (pifi.layer=auto): "effect" (PCA + counterfactual probe) or "corr" (cheaper).
    config.pifi.selection = "effect"
    # Labelled training examples the selection runs through the LLM.
    config.pifi.selection_samples = 400
    # Principal components per layer, and how many of the most label-correlated are removed.
    config.pifi.selection_pcs = 16
    config.pifi.selection_top_pc = 5
    # Share of the selection examples held out to score the probe.
    config.pifi.selection_holdout = 0.3
    # Tokens per example, batch size and dtype of the LLM forward pass of the selection.
    config.pifi.selection_max_length = 128
    config.pifi.selection_batch_size = 16
    config.pifi.selection_dtype = "bfloat16"
    # The frozen LLM layer gets no gradient and no optimizer state; everything else trains.
    config.train.trainable_rules = FROZEN_RULES

    if generation and not seq2seq:
        # Causal generation (a decoder SLM): logits of h + W_out(layer(W_in h)), W_out starting
        # at zero (the pretrained SLM at step 0); False: of W_out(layer(W_in h)) alone.
        config.pifi.residual = True
        if args.get("runlocal"):
            causal_runlocal(config)
            _runlocal_selection(config)
        return config
    if seq2seq:
        # The decoder's cross-attention memory is W_out(layer(W_in e)) (paper); True: e + that,
        # W_out starting at zero.
        config.pifi.residual = False
        # The paper fine-tunes the whole SLM (the optimiser below is its classification one).
        config.peft.method = "full"

    if not seq2seq:  # (sources and targets of generation: configs/seq2seq.py's lengths)
        # The paper: max_seq_len 100 (buckets end there, so no batch is padded beyond it).
        config.data.max_length = 100
        config.data.buckets = (32, 64, 100)
        # Cross-entropy with label smoothing 0.05 (paper).
        config.train.label_smoothing = 0.05
    # The paper: 3 epochs, batch 32 (README's main job sets 1 epoch to fit 15 minutes on a CPU).
    config.train.epochs = 3
    config.train.batch_size = 32
    # Evaluate (and keep the best-validation checkpoint, which is tested) once per epoch.
    config.train.eval_every_steps = 0
    # Stop after 5 evaluations without improvement (paper: patience 5).
    config.train.early_stopping_patience = 5
    # Adam without weight decay, constant lr 5e-5, no warm-up, gradient clipping at 5 (paper).
    config.optim.name = "adam"
    config.optim.lr = 5e-5
    config.optim.schedule = "constant"
    config.optim.warmup_steps = 0
    config.optim.warmup_ratio = 0.0
    config.optim.weight_decay = 0.0
    config.optim.clip_norm = 5.0

    if get_task(config.task).kind == "extractive_qa":
        # Extractive QA (`:task=squad_spans`, squad_v1, qa_local): the layer runs over every
        # token (a span needs them all), the windows of configs/qa.py, no label smoothing.
        config.pifi.mode = "sequence"
        config.train.label_smoothing = 0.0
        qa_data_defaults(config)

    if args.get("runlocal") and seq2seq:
        causal_runlocal(config)  # configs/causal_lm.py's tiny setting, target buckets included
        _runlocal_selection(config)
    elif args.get("runlocal"):
        # A few steps on a few examples; the tests point model.path and pifi.llm at tiny models.
        config.data.max_examples = 48
        config.data.max_length = 32
        config.data.buckets = (16, 32)
        config.train.batch_size = 8
        config.train.eval_batch_size = 16
        config.train.num_steps = 2
        config.train.eval_every_steps = 2
        config.train.checkpoint_every_steps = 1
        config.train.progress_bar = False
        _runlocal_selection(config)
        if config.pifi.mode == "sequence" and get_task(config.task).kind == "extractive_qa":
            # Windows of the tiny QA setting: a stride below the window length.
            config.data.max_length = 48
            config.data.doc_stride = 16
            config.data.buckets = (32, 48)
    return config


def _runlocal_selection(config) -> None:
    """The tiny setting's layer selection: a few examples in float32."""
    config.pifi.selection_samples = 48
    config.pifi.selection_batch_size = 8
    config.pifi.selection_dtype = "float32"
