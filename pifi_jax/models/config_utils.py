"""Strict reading of Hugging Face config dicts: every field is used, ignored on purpose, or refused."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

# Fields every transformers config carries (bookkeeping, output switches, label names): never
# architecture. Taken from transformers' PretrainedConfig so new releases are covered.
_GENERIC_FIELDS = frozenset(
    {
        "_name_or_path",
        "architectures",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "id2label",
        "label2id",
        "problem_type",
        "return_dict",
        "output_attentions",
        "output_hidden_states",
        "is_encoder_decoder",
        "model_type",
        "finetuning_task",
        "tokenizer_class",
        "prefix",
        "task_specific_params",
        "pruned_heads",
        "torchscript",
        "use_bfloat16",
        "tf_legacy_loss",
        "num_labels",
    }
)


def generic_fields() -> frozenset[str]:
    try:
        from transformers import PretrainedConfig

        return _GENERIC_FIELDS | frozenset(PretrainedConfig().to_dict())
    except ImportError:  # transformers is a dependency, but keep config parsing usable without it
        return _GENERIC_FIELDS


def select_fields(
    hf: Mapping[str, Any],
    fields: Iterable[str],
    ignored: Iterable[str],
    required_values: Mapping[str, Any],
    *,
    family: str,
) -> dict[str, Any]:
    """Returns the entries of `hf` that are dataclass `fields` (model_type included).

    Raises ValueError naming the first field that is neither a field, ignored, nor generic, or a
    field whose value differs from the only one the implementation supports.
    """
    fields = set(fields)
    skip = set(ignored) | generic_fields()
    out = {}
    for key, value in hf.items():
        if key in required_values:
            if value != required_values[key] and value is not None:
                raise ValueError(
                    f"config field {key}={value!r} is not supported for {family} "
                    f"(only {required_values[key]!r})"
                )
        elif key in fields:
            out[key] = value
        elif key not in skip:
            raise ValueError(
                f"config field {key!r} (= {value!r}) is not supported for {family}; "
                "pifi_jax refuses configs it cannot reproduce exactly"
            )
    if "model_type" in fields:
        out["model_type"] = hf.get("model_type")
    return out
