"""Depth mapping between a small model's layers and a large model's, and the tokenizer check.

The transfer carries each SLM layer's modules to a contiguous run of LLM layers: SLM layer i
serves LLM layers [i * L_llm / L_slm, (i + 1) * L_llm / L_slm) (real-number bounds), so LLM layer
j is served by SLM layer floor(j * L_slm / L_llm). Every LLM layer gets exactly one source, and
the runs keep the order of depth. When the SLM is the deeper one, some of its layers serve none.

The SLM and the LLM must share their tokenizer: the modules are learnt on the SLM's token
sequences, W_plug is fitted on the two models' states at the same token positions, and the task
data are tokenized once. A pair whose tokenizers differ is refused (`check_same_tokenizer`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def depth_map(slm_layers: int, llm_layers: int) -> list[int]:
    """For each LLM layer j (0..llm_layers-1), the SLM layer that serves it."""
    if slm_layers < 1 or llm_layers < 1:
        raise ValueError(
            f"depth_map: both models need at least one layer (SLM {slm_layers}, LLM {llm_layers})"
        )
    return [j * slm_layers // llm_layers for j in range(llm_layers)]


def served_layers(slm_layers: int, llm_layers: int) -> dict[int, list[int]]:
    """SLM layer i -> the LLM layers it serves (empty when the SLM is deeper than the LLM)."""
    out: dict[int, list[int]] = {i: [] for i in range(slm_layers)}
    for j, i in enumerate(depth_map(slm_layers, llm_layers)):
        out[i].append(j)
    return out


def _record(slm_layers: int, llm_layers: int) -> dict:
    served = served_layers(slm_layers, llm_layers)
    return {
        "slm_layers": slm_layers,
        "llm_layers": llm_layers,
        "llm_to_slm": depth_map(slm_layers, llm_layers),
        "slm_to_llm": {str(i): layers for i, layers in served.items()},
    }


def _write(path, record: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return path


def write_depth_map(path: str | os.PathLike, slm_layers: int, llm_layers: int) -> Path:
    """Writes the mapping as JSON: {"slm_layers", "llm_layers", "llm_to_slm", "slm_to_llm"}."""
    return _write(path, _record(slm_layers, llm_layers))


def write_stack_depth_maps(path: str | os.PathLike, stacks: dict[str, tuple[int, int]]) -> Path:
    """An encoder-decoder's mapping, each stack alone: {stack: write_depth_map's record} from
    {stack: (SLM blocks, LLM blocks)}."""
    return _write(path, {name: _record(*layers) for name, layers in stacks.items()})


_PROBE = (
    "The bridge model adapts PEFT modules: Größe, 東京, naïve café, x_{i+1} = f(x_i) \t\n  "
    "def main():\n    return 42  # done"
)


def check_same_tokenizer(slm_tokenizer, llm_tokenizer, slm_name: str, llm_name: str) -> None:
    """Refuses a pair whose tokenizers differ (vocabulary, or the ids of a probe text).

    Raises ValueError naming both models and the first difference found.
    """
    slm_vocab, llm_vocab = slm_tokenizer.get_vocab(), llm_tokenizer.get_vocab()
    if slm_vocab != llm_vocab:
        only_slm = sorted(set(slm_vocab) - set(llm_vocab))[:5]
        only_llm = sorted(set(llm_vocab) - set(slm_vocab))[:5]
        moved = sorted(t for t in set(slm_vocab) & set(llm_vocab) if slm_vocab[t] != llm_vocab[t])
        raise ValueError(
            f"bridge transfer needs the SLM and the LLM to share one tokenizer, but {slm_name} "
            f"({len(slm_vocab)} tokens) and {llm_name} ({len(llm_vocab)} tokens) differ: tokens "
            f"only in the SLM's {only_slm}, only in the LLM's {only_llm}, "
            f"{len(moved)} shared tokens with other ids{' e.g. ' + repr(moved[:3]) if moved else ''}. "
            "Pick two models of one family (e.g. Qwen2.5-Coder-0.5B -> 1.5B, gpt2 -> gpt2-xl)"
        )
    a = list(slm_tokenizer(_PROBE)["input_ids"])
    b = list(llm_tokenizer(_PROBE)["input_ids"])
    if a != b:
        raise ValueError(
            f"bridge transfer needs the SLM and the LLM to share one tokenizer: {slm_name} and "
            f"{llm_name} have the same vocabulary but encode a probe text differently "
            f"({a[:12]}... vs {b[:12]}...; special tokens or normalisation differ)"
        )
