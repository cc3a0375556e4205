"""Shared pieces of the benchmarks: the cases (shapes), timing, the machine header, markdown.

Both sides of `suite.py` (pifi_jax and the PyTorch reference in `torch_reference.py`) build their
models from the same `Case`: one Hugging Face config dict per model, turned into a pifi_jax config
(`registry.config_from_hf`) on one side and a `transformers` config on the other, so the two can
only differ in framework, never in shape. The smoke cases are the full cases with smaller numbers
in the same fields.

Nothing here imports jax or torch at module level: the parent process of an isolated run
(`suite.py` without `--no-isolate`) only orchestrates and must not claim the accelerator.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import math
import os
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

# ---------------------------------------------------------------------------------------------
# Model shapes, as Hugging Face config dicts (model_type included).

BERT_BASE = {
    "model_type": "bert",
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
}
BERT_SMOKE = {
    **BERT_BASE,
    "vocab_size": 128,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}
# Llama-3.1-8B's config.json, less the token ids (irrelevant to a benchmark).
LLAMA_31_8B = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": False,
}
LLAMA_SMOKE = {
    **LLAMA_31_8B,
    "vocab_size": 128,
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}

ROWS = (1, 2, 3, 4, 5)
ROW_TITLES = {
    1: "bert-base sequence classification, full fine-tuning",
    2: "bert-base LoRA r8 (query, value)",
    3: "bert-base IA3 (key, value, output.dense)",
    4: "PiFi: bert-base + one frozen Llama-3.1-8B-shaped layer, vs base",
    5: "Llama-3.1-8B-shaped causal LM, LoRA r16 (q,k,v,o,gate,up,down), remat",
}
LLAMA_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Optimizer of every row (both frameworks): AdamW, constant learning rate, clipping at 1.0 (the
# Hugging Face Trainer's default), no weight decay on biases and LayerNorm parameters.
LEARNING_RATE = 1e-5
WEIGHT_DECAY = 0.01
CLIP_NORM = 1.0


@dataclasses.dataclass(frozen=True)
class Case:
    """One measured configuration (one framework line per variant in the table).

    method: "full" | "lora" | "ia3" (encoder classification), "pifi" | "base" (the PiFi
      classifier with / without the plugged layer), "causal_lora" (a decoder LM with LoRA).
    encoder: HF config dict of the encoder (methods other than causal_lora).
    decoder: HF config dict of the Llama model (causal_lora) or of the model whose last layer
      PiFi plugs in (pifi).
    peft: the PEFT method's fields (Hugging Face PEFT names), or None.
    remat: gradient checkpointing of every decoder layer (pifi_jax remat_policy "full";
      transformers gradient_checkpointing_enable).
    """

    row: int
    method: str
    batch: int
    length: int
    encoder: dict | None = None
    decoder: dict | None = None
    peft: dict | None = None
    num_labels: int = 2
    remat: bool = False

    @property
    def tokens(self) -> int:
        return self.batch * self.length

    @property
    def label(self) -> str:
        return f"{self.method} {self.batch}x{self.length}"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Case:
        return cls(**data)


def cases_for_row(row: int, smoke: bool, llama_batch: int | None = None) -> list[Case]:
    """The cases of one issue row. Full size: the issue's shapes; smoke: the same structure tiny.

    llama_batch: row 5's batch (the suite steps it down when a framework runs out of memory).
    """
    bert = BERT_SMOKE if smoke else BERT_BASE
    llama = LLAMA_SMOKE if smoke else LLAMA_31_8B
    length = 16 if smoke else 128
    batches = (2,) if smoke else (32, 256)  # the smoke: one shape per row, to stay quick
    if row == 1:
        return [Case(1, "full", b, length, encoder=bert) for b in batches]
    if row == 2:
        lora = {"method": "lora", "r": 8, "lora_alpha": 16, "target_modules": ("query", "value")}
        return [Case(2, "lora", b, length, encoder=bert, peft=lora) for b in batches]
    if row == 3:
        ia3 = {
            "method": "ia3",
            "target_modules": ("key", "value", "output.dense"),
            "feedforward_modules": ("output.dense",),
        }
        return [Case(3, "ia3", b, length, encoder=bert, peft=ia3) for b in batches]
    if row == 4:
        batch = batches[0]
        return [
            Case(4, "pifi", batch, length, encoder=bert, decoder=llama),
            Case(4, "base", batch, length, encoder=bert),
        ]
    if row == 5:
        lora = {"method": "lora", "r": 16, "lora_alpha": 32, "target_modules": LLAMA_LORA_TARGETS}
        batch = llama_batch or (2 if smoke else 8)
        return [
            Case(
                5, "causal_lora", batch, 16 if smoke else 1024, decoder=llama, peft=lora, remat=True
            )
        ]
    raise ValueError(f"row {row} does not exist; rows are {ROWS}")


def synthetic_batch(case: Case, seed: int = 0) -> dict:
    """Random token ids (numpy int32), all-ones mask, zero token types and random labels: the same
    arrays for both frameworks."""
    import numpy as np

    rng = np.random.default_rng(seed)
    config = case.encoder if case.method != "causal_lora" else case.decoder
    shape = (case.batch, case.length)
    batch = {
        "input_ids": rng.integers(0, config["vocab_size"], shape).astype(np.int32),
        "attention_mask": np.ones(shape, np.int32),
    }
    if case.method != "causal_lora":
        batch["token_type_ids"] = np.zeros(shape, np.int32)
        batch["labels"] = rng.integers(0, case.num_labels, (case.batch,)).astype(np.int32)
    return batch


def llama_layer_params(config: dict) -> int:
    """Parameters of one Llama decoder layer (no biases): attention, gated MLP, two RMSNorms."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q_out = config["num_attention_heads"] * head_dim
    kv_out = config["num_key_value_heads"] * head_dim
    attention = hidden * q_out * 2 + hidden * kv_out * 2  # q, o; k, v
    return attention + 3 * hidden * inter + 2 * hidden


# ---------------------------------------------------------------------------------------------
# Timing


@dataclasses.dataclass
class Timing:
    """first_s: the first call (compilation for torch.compile, start-up costs otherwise);
    times: the timed steps after the warm-up, in seconds."""

    first_s: float
    times: list[float]

    @property
    def median_s(self) -> float:
        return statistics.median(self.times)


def time_steps(
    step: Callable[[], Any], sync: Callable[[Any], Any], *, warmup: int, steps: int
) -> Timing:
    """Runs `step` warmup + steps times, synchronising the device after every call (so that a
    step's time is its device time, not its dispatch time); the first `warmup` calls are not timed
    (their first is reported separately)."""
    if warmup < 1:
        raise ValueError(f"warmup must be >= 1 (the first call compiles), got {warmup}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    start = time.perf_counter()
    sync(step())
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        sync(step())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        sync(step())
        times.append(time.perf_counter() - start)
    return Timing(first, times)


# ---------------------------------------------------------------------------------------------
# The machine and the versions


_PACKAGES = (
    "jax",
    "jaxlib",
    "jax-cuda12-plugin",
    "flax",
    "optax",
    "torch",
    "transformers",
    "peft",
    "numpy",
)


def package_versions(names: Sequence[str] = _PACKAGES) -> dict[str, str]:
    """Installed versions, read from the package metadata (nothing is imported)."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def nvidia_gpus() -> list[dict[str, str]]:
    """Name, driver and memory of each NVIDIA GPU (from nvidia-smi; empty without one)."""
    if shutil.which("nvidia-smi") is None:
        return []
    query = "--query-gpu=name,driver_version,memory.total"
    try:
        out = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        name, driver, memory = (part.strip() for part in line.split(","))
        gpus.append({"name": name, "driver": driver, "memory": memory})
    return gpus


def environment() -> dict[str, Any]:
    """What a results section is headed by: date, machine, GPUs, driver, library versions."""
    return {
        "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "python": platform.python_version(),
        "gpus": nvidia_gpus(),
        "versions": package_versions(),
    }


def environment_lines(env: dict[str, Any]) -> list[str]:
    """Markdown bullet lines for `environment()`."""
    gpus = env["gpus"]
    if gpus:
        names = ", ".join(f"{g['name']} ({g['memory']})" for g in gpus)
        gpu_line = f"- GPU: {names}; driver {gpus[0]['driver']}"
    else:
        gpu_line = "- GPU: none (no nvidia-smi / no NVIDIA GPU)"
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    return [
        f"- date: {env['date']}",
        gpu_line,
        f"- machine: {env['machine']}",
        f"- versions: python {env['python']}, {versions}",
    ]


# ---------------------------------------------------------------------------------------------
# Formatting


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> str:
    """A markdown table; align: one character per column, "l" or "r" (default: left)."""
    align = align.ljust(len(header), "l")
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"table row has {len(row)} cells, the header {len(header)}: {row}")
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def fmt_bytes(n: float | None) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def fmt_number(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits}f}"


def fmt_count(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


# ---------------------------------------------------------------------------------------------
# Configs


def apply_overrides(config, items: Sequence[tuple[str, Any] | str]) -> None:
    """Sets dotted fields of an ml_collections config in place, as the launcher's
    --config.a.b=value does: each item is ("a.b", value) or "a.b=value"; a string value for a
    field that is not a string is read as a Python literal and cast to the field's type
    (e.g. "data.buckets=(64, 128)")."""
    import ast

    for item in items:
        dotted, value = item.split("=", 1) if isinstance(item, str) else item
        *sections, key = dotted.split(".")
        node = config
        for section in sections:
            node = node[section]
        current = node[key]
        if isinstance(value, str) and not isinstance(current, str):
            value = type(current)(ast.literal_eval(value))
        node[key] = value


def publish(text: str, out: str) -> None:
    """Prints a report section and appends it to the markdown file `out` ("-": print only)."""
    print(text)
    if out != "-":
        with open(out, "a", encoding="utf-8") as f:
            f.write("\n" + text)
