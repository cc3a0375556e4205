"""PEFT method configs: frozen dataclasses whose field names follow Hugging Face PEFT.

Only the fields pifi_jax implements exist; `from_hf_dict` refuses a PEFT adapter_config.json that
asks for something else (naming the field) instead of silently computing a different model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

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


METHODS: dict[str, Any] = {
    "full": FullConfig,
    "topk": TopKConfig,
    "bitfit": BitFitConfig,
    "lora": LoraConfig,
    "dora": DoraConfig,
    "ia3": IA3Config,
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


def from_hf_dict(hf: dict) -> PeftConfig:
    """Our config for a Hugging Face PEFT adapter_config.json dict (LORA or IA3)."""
    peft_type = hf.get("peft_type")
    cls = {"LORA": LoraConfig, "IA3": IA3Config}.get(peft_type)
    if cls is None:
        raise ValueError(f"peft_type {peft_type!r} is not supported for import (LORA, IA3)")
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


def to_hf_dict(config: PeftConfig, task_type: str | None) -> dict:
    """adapter_config.json contents for a LoRA/DoRA or IA3 config."""

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
    out["fan_in_fan_out"] = False
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
    targets = dict(
        target_modules=_names(cfg.target_modules),
        exclude_modules=_names(cfg.exclude_modules),
        modules_to_save=saved,
    )
    if method == "ia3":
        return IA3Config(feedforward_modules=_names(cfg.feedforward_modules), **targets)
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        use_rslora=cfg.use_rslora,
        use_dora=method == "dora",
        bias=cfg.bias,
        **targets,
    )
