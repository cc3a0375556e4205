"""PEFT method configs: frozen dataclasses whose field names follow Hugging Face PEFT.

Only the fields pifi_jax implements exist; `from_hf_dict` refuses a PEFT adapter_config.json that
asks for something else (naming the field) instead of silently computing a different model.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

from pifi_jax.layers.activations import activation

TargetSpec = str | tuple[str, ...] | None


def _as_targets(value) -> TargetSpec:
    if value is None or isinstance(value, str):
        return value
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class PeftConfig:
    """Fields shared by the methods that attach to modules."""

    method: ClassVar[str] = ""
    # HF PEFT rules: a string is a regex full-matched on the module name; a list matches a module
    # name exactly or as a dotted suffix. None = the architecture's default targets.
    target_modules: TargetSpec = None
    exclude_modules: TargetSpec = None
    # Only layers with these indices (the number after `layer.`/`layers.`/`h.`/`block.`).
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: TargetSpec = None
    # Modules trained fully and saved with the adapter (None = the task head, as HF PEFT does).
    modules_to_save: tuple[str, ...] | None = None

    def __post_init__(self):
        for name in ("target_modules", "exclude_modules", "layers_pattern"):
            object.__setattr__(self, name, _as_targets(getattr(self, name)))
        for name in ("layers_to_transform", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, int):
                value = (value,)
            object.__setattr__(self, name, None if value is None else tuple(value))


@dataclasses.dataclass(frozen=True)
class LoraConfig(PeftConfig):
    """LoRA (Hu et al. 2021): y = W x + b + (lora_alpha / r) * B A dropout(x).

    use_rslora: scale by lora_alpha / sqrt(r) instead (Kalajdzievski 2023).
    use_dora: DoRA (Liu et al. 2024), a learned magnitude per output times the normalised direction.
    bias: "none" | "all" (every bias trains) | "lora_only" (biases of targeted layers train).
    init_lora_weights: True = A Kaiming-uniform (as PEFT), "gaussian" = A ~ N(0, 1/r), both with
      B = 0 (the model starts as the base model); False = B random too (as PEFT: for tests).
    """

    method: ClassVar[str] = "lora"
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    bias: str = "none"
    init_lora_weights: bool | str = True

    def __post_init__(self):
        super().__post_init__()
        if self.r < 1:
            raise ValueError(f"LoRA r must be >= 1, got {self.r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"LoRA bias must be none, all or lora_only, got {self.bias!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported "
                "(True, False or 'gaussian')"
            )

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)


def DoraConfig(**kwargs) -> LoraConfig:  # noqa: N802 (a constructor, named like the classes)
    """LoraConfig(use_dora=True, ...)."""
    return LoraConfig(use_dora=True, **kwargs)


@dataclasses.dataclass(frozen=True)
class IA3Config(PeftConfig):
    """IA3 (Liu et al. 2022): learned vectors rescale keys, values and the FFN inner activation.

    A targeted module that is also in `feedforward_modules` scales its input ([in]); any other
    targeted module scales its output ([out]). Vectors start at 1 (identity).
    """

    method: ClassVar[str] = "ia3"
    feedforward_modules: TargetSpec = None

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "feedforward_modules", _as_targets(self.feedforward_modules))


ADAPTER_KINDS = ("houlsby", "pfeiffer")


@dataclasses.dataclass(frozen=True)
class AdapterConfig(PeftConfig):
    """Bottleneck adapters: h + up(act(down(h))) on a sub-layer's output, before residual + norm.

    kind: "houlsby" (Houlsby et al. 2019: after the attention-output and the FFN-output
      projections) or "pfeiffer" (Pfeiffer et al. 2020: after the FFN-output projection only).
    target_modules: the projections whose output gets an adapter (HF PEFT rules); None = the
      kind's sites for the architecture (pifi_jax.peft.targets.ADAPTER_TARGETS).
    bottleneck_size: m in down [d, m] and up [m, d].
    non_linearity: activation between down and up, by Hugging Face name (relu, gelu, ...).
    train_layernorms: every LayerNorm trains too; None = the kind's default (houlsby: yes).
    """

    method: ClassVar[str] = "adapter"
    kind: str = "houlsby"
    bottleneck_size: int = 64
    non_linearity: str = "relu"
    train_layernorms: bool | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.kind not in ADAPTER_KINDS:
            raise ValueError(f"adapter kind must be one of {ADAPTER_KINDS}, got {self.kind!r}")
        if self.bottleneck_size < 1:
            raise ValueError(f"bottleneck_size must be >= 1, got {self.bottleneck_size}")
        activation(self.non_linearity)  # refuses unknown names
        if self.train_layernorms is None:
            object.__setattr__(self, "train_layernorms", self.kind == "houlsby")


@dataclasses.dataclass(frozen=True)
class VirtualTokenConfig:
    """Fields shared by prefix and prompt tuning (names as in HF PEFT's PromptLearningConfig).

    token_dim, num_layers, num_attention_heads: the model's sizes the stored tensors were made
    for; None = the model's own. When set (an imported adapter) they are checked against it.
    """

    method: ClassVar[str] = ""
    num_virtual_tokens: int = 20
    token_dim: int | None = None
    num_layers: int | None = None
    num_attention_heads: int | None = None
    # Modules trained fully and saved with the adapter (None = the task head, as HF PEFT does).
    modules_to_save: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")
        if self.modules_to_save is not None:
            object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save))


@dataclasses.dataclass(frozen=True)
class PrefixTuningConfig(VirtualTokenConfig):
    """Prefix tuning (Li & Liang 2021): P trained keys and values in front of every layer's own.

    prefix_projection: reparameterise the prefix as embedding [P, W] -> Linear(W,
      encoder_hidden_size) -> tanh -> Linear(num_layers * 2 * W) (trained jointly; only its output
      matters once trained, which is what the Hugging Face PEFT file holds). W = token_dim: the
      hidden size, or kv_heads * head_dim for a decoder with grouped-query attention (as PEFT).
    encoder_hidden_size: the MLP's inner width; None = W.
    """

    method: ClassVar[str] = "prefix"
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None


PROMPT_INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")


@dataclasses.dataclass(frozen=True)
class PromptTuningConfig(VirtualTokenConfig):
    """Prompt tuning (Lester et al. 2021): P trained token embeddings in front of the input.

    prompt_tuning_init: "RANDOM" (N(0, 1), as HF PEFT), "TEXT" (the word embeddings of a text's
      tokens, repeated or cut to P) or "SAMPLE_VOCAB" (of P random vocabulary tokens).
    TEXT takes either prompt_tuning_init_token_ids, or prompt_tuning_init_text split by the
    tokenizer at tokenizer_name_or_path (special tokens included, as HF PEFT does).
    """

    method: ClassVar[str] = "prompt"
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    prompt_tuning_init_token_ids: tuple[int, ...] | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.prompt_tuning_init not in PROMPT_INITS:
            raise ValueError(
                f"prompt_tuning_init must be one of {PROMPT_INITS}, got {self.prompt_tuning_init!r}"
            )
        ids = self.prompt_tuning_init_token_ids
        if ids is not None:
            object.__setattr__(self, "prompt_tuning_init_token_ids", tuple(int(i) for i in ids))
        if self.prompt_tuning_init == "TEXT" and not ids:
            if not (self.prompt_tuning_init_text and self.tokenizer_name_or_path):
                raise ValueError(
                    "prompt_tuning_init='TEXT' needs prompt_tuning_init_token_ids, or "
                    "prompt_tuning_init_text and tokenizer_name_or_path"
                )

    def init_token_ids(self) -> tuple[int, ...]:
        """The TEXT initialisation's token ids, repeated or cut to num_virtual_tokens."""
        ids = self.prompt_tuning_init_token_ids
        if not ids:
            from pifi_jax.data import load_tokenizer

            tokenizer = load_tokenizer(self.tokenizer_name_or_path)
            ids = tuple(tokenizer(self.prompt_tuning_init_text)["input_ids"])
        if not ids:
            raise ValueError("prompt_tuning_init='TEXT': the text has no tokens")
        reps = -(-self.num_virtual_tokens // len(ids))
        return (ids * reps)[: self.num_virtual_tokens]


@dataclasses.dataclass(frozen=True)
class BitFitConfig:
    """BitFit (Ben Zaken et al. 2021): only biases (and the task head) train."""

    method: ClassVar[str] = "bitfit"
    modules_to_save: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class TopKConfig:
    """Fine-tune only the top k encoder layers (and the task head); the rest stays frozen."""

    method: ClassVar[str] = "topk"
    k: int = 1
    modules_to_save: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.k < 0:
            raise ValueError(f"top-k needs k >= 0, got {self.k}")


@dataclasses.dataclass(frozen=True)
class FullConfig:
    """Full fine-tuning: everything trains (the baseline every method is compared with)."""

    method: ClassVar[str] = "full"
    modules_to_save: tuple[str, ...] | None = None


# Method names as the run config (configs/classify.py `peft.method`) spells them.
METHODS: dict[str, Any] = {
    "full": FullConfig,
    "topk": TopKConfig,
    "bitfit": BitFitConfig,
    "lora": LoraConfig,
    "dora": DoraConfig,
    "ia3": IA3Config,
    "adapter_houlsby": functools.partial(AdapterConfig, kind="houlsby"),
    "adapter_pfeiffer": functools.partial(AdapterConfig, kind="pfeiffer"),
    "prefix": PrefixTuningConfig,
    "prompt": PromptTuningConfig,
}
# Config class of each `config.method` (what a native adapter file records).
CONFIG_CLASSES: dict[str, Any] = {
    cls.method: cls
    for cls in (
        FullConfig,
        TopKConfig,
        BitFitConfig,
        LoraConfig,
        IA3Config,
        AdapterConfig,
        PrefixTuningConfig,
        PromptTuningConfig,
    )
}

# adapter_config.json fields that do not change the computation (bookkeeping) or that we check
# explicitly below.
_HF_BOOKKEEPING = {
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "auto_mapping",
    "peft_version",
    "megatron_config",
    "megatron_core",
    "fan_in_fan_out",
    "init_ia3_weights",
    "loftq_config",
    "layer_replication",
    "ensure_weight_tying",
    "qalora_group_size",
}
# Fields accepted only with their neutral value.
_HF_NEUTRAL = {
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "lora_bias": (False,),
    "use_qalora": (False, None),
    "use_bdlora": (None, False),
    "target_parameters": (None, [], ()),
    "trainable_token_indices": (None,),
    "alora_invocation_tokens": (None,),
    "eva_config": (None,),
    "corda_config": (None,),
    "arrow_config": (None,),
    "kasa_config": (None,),
    "lora_ga_config": (None,),
    "monteclora_config": (None,),
    "velora_config": (None,),
}


# Prompt-learning fields of adapter_config.json that only say how to initialise for training,
# which a stored adapter replaces, or that are checked by hand below.
_HF_VIRTUAL_BOOKKEEPING = {
    "num_transformer_submodules",
    "init_weights",
    "prompt_tuning_init",
    "prompt_tuning_init_text",
    "tokenizer_name_or_path",
    "tokenizer_kwargs",
    "prefix_projection",
    "encoder_hidden_size",
}


def _virtual_from_hf(cls, hf: dict):
    """PREFIX_TUNING / PROMPT_TUNING: the stored tensor is the prefix (or prompt) itself."""
    if hf.get("num_transformer_submodules") not in (None, 1):
        raise ValueError(
            f"num_transformer_submodules={hf['num_transformer_submodules']} (an encoder-decoder "
            "adapter) is not supported"
        )
    fields = {f.name for f in dataclasses.fields(VirtualTokenConfig)}
    kwargs = {}
    for key, value in hf.items():
        if key in fields:
            kwargs[key] = value
        elif key not in _HF_BOOKKEEPING | _HF_VIRTUAL_BOOKKEEPING:
            raise ValueError(f"adapter_config.json field {key!r} (= {value!r}) is not supported")
    # A PEFT prefix file holds the prefix, not the MLP that produced it (prefix_projection), and
    # an initialisation is replaced by the stored values: import as a plain prefix / random init.
    return cls(**kwargs)


def from_hf_dict(hf: dict) -> PeftConfig:
    """Our config for a Hugging Face PEFT adapter_config.json dict.

    LORA and IA3 as they are; PREFIX_TUNING and PROMPT_TUNING as the tensors the file holds (a
    prefix made with prefix_projection imports as a plain prefix: the file holds the MLP's output).
    """
    peft_type = hf.get("peft_type")
    virtual = {"PREFIX_TUNING": PrefixTuningConfig, "PROMPT_TUNING": PromptTuningConfig}
    if peft_type in virtual:
        return _virtual_from_hf(virtual[peft_type], hf)
    cls = {"LORA": LoraConfig, "IA3": IA3Config}.get(peft_type)
    if cls is None:
        raise ValueError(
            f"peft_type {peft_type!r} is not supported for import "
            "(LORA, IA3, PREFIX_TUNING, PROMPT_TUNING)"
        )
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in hf.items():
        if key in fields:
            kwargs[key] = value
        elif key in _HF_NEUTRAL:
            if value not in _HF_NEUTRAL[key]:
                raise ValueError(f"adapter_config.json field {key}={value!r} is not supported")
        elif key not in _HF_BOOKKEEPING:
            raise ValueError(f"adapter_config.json field {key!r} (= {value!r}) is not supported")
    if hf.get("fan_in_fan_out"):
        kwargs.pop("fan_in_fan_out", None)  # Conv1D layouts are handled by the architecture
    return cls(**kwargs)


def to_hf_dict(config: PeftConfig, task_type: str | None, fan_in_fan_out: bool = False) -> dict:
    """adapter_config.json contents for a LoRA/DoRA or IA3 config; fan_in_fan_out: the targets
    are Conv1D modules (GPT-2)."""

    def listify(v):
        return list(v) if isinstance(v, tuple) else v

    out = {k: listify(v) for k, v in dataclasses.asdict(config).items()}
    if config.method == "ia3":
        # PEFT's IA3Config has no layer selection; the exact target names written by
        # save_adapter already encode it.
        out.pop("layers_to_transform")
        out.pop("layers_pattern")
    out["peft_type"] = {"lora": "LORA", "ia3": "IA3"}[config.method]
    out["task_type"] = task_type
    out["inference_mode"] = True
    out["base_model_name_or_path"] = None
    out["revision"] = None
    out["fan_in_fan_out"] = fan_in_fan_out
    return out


def virtual_to_hf_dict(
    config: VirtualTokenConfig,
    task_type: str | None,
    *,
    token_dim: int,
    num_layers: int,
    num_attention_heads: int,
    encoder_hidden_size: int | None = None,
) -> dict:
    """adapter_config.json contents for prefix or prompt tuning on a model of these sizes."""
    out = {
        "peft_type": {"prefix": "PREFIX_TUNING", "prompt": "PROMPT_TUNING"}[config.method],
        "task_type": task_type,
        "inference_mode": True,
        "base_model_name_or_path": None,
        "revision": None,
        "num_virtual_tokens": config.num_virtual_tokens,
        "token_dim": token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": num_attention_heads,
        "num_layers": num_layers,
        "modules_to_save": None if config.modules_to_save is None else list(config.modules_to_save),
    }
    if config.method == "prefix":
        out.update(
            prefix_projection=config.prefix_projection,
            encoder_hidden_size=encoder_hidden_size,
            init_weights=None,
        )
    else:
        # PEFT validates TEXT against a tokenizer (and never uses it when loading); an init from
        # bare token ids has none to name, so it is recorded as RANDOM there.
        init = config.prompt_tuning_init
        if init == "TEXT" and not (
            config.prompt_tuning_init_text and config.tokenizer_name_or_path
        ):
            init = "RANDOM"
        out.update(
            prompt_tuning_init=init,
            prompt_tuning_init_text=config.prompt_tuning_init_text if init == "TEXT" else None,
            tokenizer_name_or_path=config.tokenizer_name_or_path if init == "TEXT" else None,
            tokenizer_kwargs=None,
        )
    return out


def _names(text: str):
    """'' -> None; 'a,b' -> ('a', 'b') (names or suffixes); 're:PATTERN' -> 'PATTERN' (a regex)."""
    text = text.strip()
    if text.startswith("re:"):
        return text[3:]
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    return items or None


def from_flat_config(cfg) -> Any:
    """A method config from the `peft` section of a run config (configs/classify.py)."""
    method = cfg.method
    if method not in METHODS:
        raise ValueError(f"peft.method={method!r} is unknown; choose one of {sorted(METHODS)}")
    saved = tuple(t.strip() for t in cfg.modules_to_save.split(",") if t.strip()) or None
    if method == "full":
        return FullConfig(modules_to_save=saved)
    if method == "bitfit":
        return BitFitConfig(modules_to_save=saved)
    if method == "topk":
        return TopKConfig(k=cfg.k, modules_to_save=saved)
    if method == "prefix":
        return PrefixTuningConfig(
            num_virtual_tokens=cfg.num_virtual_tokens,
            prefix_projection=cfg.prefix_projection,
            encoder_hidden_size=cfg.encoder_hidden_size or None,
            modules_to_save=saved,
        )
    if method == "prompt":
        return PromptTuningConfig(
            num_virtual_tokens=cfg.num_virtual_tokens,
            prompt_tuning_init=cfg.prompt_tuning_init,
            prompt_tuning_init_text=cfg.prompt_tuning_init_text or None,
            tokenizer_name_or_path=cfg.tokenizer_name_or_path or None,
            modules_to_save=saved,
        )
    targets = dict(
        target_modules=_names(cfg.target_modules),
        exclude_modules=_names(cfg.exclude_modules),
        modules_to_save=saved,
    )
    if method == "ia3":
        return IA3Config(feedforward_modules=_names(cfg.feedforward_modules), **targets)
    if method.startswith("adapter_"):
        layernorms = {"auto": None, "true": True, "false": False}
        choice = cfg.train_layernorms.lower()
        if choice not in layernorms:
            raise ValueError(
                f"peft.train_layernorms={cfg.train_layernorms!r}: use auto, true or false"
            )
        return AdapterConfig(
            kind=method.removeprefix("adapter_"),
            bottleneck_size=cfg.bottleneck_size,
            non_linearity=cfg.non_linearity,
            train_layernorms=layernorms[choice],
            **targets,
        )
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        use_rslora=cfg.use_rslora,
        use_dora=method == "dora",
        bias=cfg.bias,
        **targets,
    )
