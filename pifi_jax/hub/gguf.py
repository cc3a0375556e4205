"""Reading llama.cpp GGUF checkpoints (architectures `llama` and `qwen2`) as Hugging Face ones.

A GGUF file holds the config (as `<arch>.*` metadata), the tokenizer (`tokenizer.ggml.*`) and the
tensors, often quantized. `GGUFCheckpoint` offers the same `keys()` / `get(key)` interface as
files.CheckpointReader under Hugging Face tensor names, so hub/convert.py loads it unchanged:
  - names: `blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`, etc. (_NAMES; qwen2
    adds the q, k and v biases);
  - values: dequantized to float32 by the `gguf` package (gguf.quants.dequantize: F32, F16, BF16,
    Q4_0 ... Q8_0 and the K-quants Q2_K ... Q6_K), one tensor at a time, when asked for. The header
    is memory-mapped; a tensor's bytes are read with one `pread` when `get` asks for it, so the
    rest of the file is never read;
  - layout: for `llama`, llama.cpp permutes the rows of q and k for its adjacent-pairs RoPE; `get`
    undoes it, giving the rotate-half layout of transformers (and layers/rotary.py). llama.cpp
    writes `qwen2` in the rotate-half layout already (its NEOX RoPE), so nothing is undone there.
The values are what the file holds: a Q4 file gives dequantized 4-bit weights, not the originals.

The tokenizer is not read here; transformers builds it offline from the same file:
`AutoTokenizer.from_pretrained(directory, gguf_file=filename)`.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from pifi_jax import assets

# Quantized bytes dequantized at once (GGUFFile.get): bounds its transient float copies.
_DEQUANTIZE_BYTES = 16 * 2**20


def _aligned_empty(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialised float32 array at a 64-byte boundary, which XLA's CPU client takes
    without a copy (jax.device_put aliases it): a loaded tensor is then held once."""
    size = int(np.prod(shape, dtype=np.int64)) * 4
    buffer = np.empty(size + 64, np.uint8)
    start = (-buffer.ctypes.data) % 64
    return buffer[start : start + size].view(np.float32).reshape(shape)


# llama.cpp tensor name -> Hugging Face name ({} = layer index).
_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}
# Per architecture: the extra tensor names, whether q/k rows are permuted, and config fields the
# metadata does not hold.
_ARCHS = {
    "llama": dict(names={}, permuted_qk=True, config={}),
    "qwen2": dict(
        names={
            f"blk.{{}}.attn_{p}.bias": f"model.layers.{{}}.self_attn.{p}_proj.bias" for p in "qkv"
        },
        permuted_qk=False,
        config={"use_sliding_window": False},
    ),
}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")
# `<arch>.<key>` metadata -> Hugging Face config field.
_CONFIG_KEYS = {
    "block_count": "num_hidden_layers",
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.key_length": "head_dim",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
}
# `<arch>.<key>` metadata checked against the config rather than copied.
_CHECKED_KEYS = (
    "rope.dimension_count",
    "attention.value_length",
    "rope.scaling.type",
    "rope.scaling.factor",
)
_TOKEN_IDS = {"bos_token_id": "bos", "eos_token_id": "eos", "pad_token_id": "padding"}


def find_gguf(path_or_hub_id: str | os.PathLike) -> Path | None:
    """The GGUF file a name points at: a `.gguf` file, an `asset:` resolving to one, or a directory
    with exactly one `.gguf` and no config.json. None for anything else (a HF checkpoint)."""
    name = str(path_or_hub_id)
    path = assets.locate(name) if name.startswith(assets.PREFIX) else Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        files = sorted(path.glob("*.gguf"))
        if len(files) > 1:
            raise ValueError(
                f"{path} holds several GGUF files; pass one: {[f.name for f in files]}"
            )
        if files:
            return files[0]
    return None


def unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row order: per head, [pairs, 2] rows -> [2, pairs] (rotate-half)."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


class GGUFCheckpoint:
    """Hugging Face-named, dequantized view of a GGUF file (same interface as CheckpointReader).

    Attributes:
      hf_config: the Hugging Face config dict built from the metadata.
      opened_files: {file name}; a GGUF checkpoint is one file.
    """

    def __init__(self, path: str | os.PathLike):
        try:
            import gguf
        except ImportError as err:
            raise ImportError(
                "reading GGUF files needs the `gguf` package (pip install gguf)"
            ) from err
        self._gguf = gguf
        self.path = Path(path)
        self.directory = self.path  # named in error messages, as a reader's directory is
        stat = self.path.stat()
        try:
            self._reader = _open_reader(str(self.path.resolve()), stat.st_mtime_ns, stat.st_size)
        except (ValueError, IndexError, OSError) as err:  # the gguf package's parse errors
            raise ValueError(
                f"{self.path}: not a readable GGUF file (truncated or corrupted?): {err}"
            ) from err
        self.opened_files = {self.path.name}
        self.arch = self._field("general.architecture")
        # Checked first: another architecture's tensors have other names.
        if self.arch not in _ARCHS:
            raise ValueError(
                f"{self.path}: GGUF architecture {self.arch!r} is not supported (only "
                f"{sorted(_ARCHS)}: Llama, SmolLM2, Mistral and others llama.cpp converts as "
                "llama; Qwen2 and Qwen2.5)"
            )
        self._spec = _ARCHS[self.arch]
        self._tensors = {}
        unknown = []
        for tensor in self._reader.tensors:
            hf_name = _hf_name(tensor.name, self._spec["names"])
            if hf_name is None:
                unknown.append(tensor.name)
            else:
                self._tensors[hf_name] = tensor
        if unknown:
            raise ValueError(
                f"{self.path}: GGUF tensors not supported ({self.arch} architecture): {unknown[:8]}"
            )
        self.hf_config = self._config()

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def get(self, key: str) -> np.ndarray:
        """One tensor, dequantized to float32, in Hugging Face's shape and row order."""
        tensor = self._tensors[key]
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists the innermost first
        rows = int(np.prod(shape[:-1], dtype=np.int64))
        raw = np.frombuffer(self._read(tensor), np.uint8).reshape(rows, -1)  # [rows, row bytes]
        # Dequantized a block of rows at a time into the result: gguf's dequantization holds
        # several float copies of what it is given, which for a vocabulary matrix (151,936 x
        # 1,536) would be about twice the result's size on top of it.
        array = _aligned_empty((rows, shape[-1]))
        step = max(1, _DEQUANTIZE_BYTES // max(1, raw.shape[1]))
        for start in range(0, rows, step):
            part = self._gguf.quants.dequantize(raw[start : start + step], tensor.tensor_type)
            array[start : start + step] = np.asarray(part, np.float32).reshape(-1, shape[-1])
        array = array.reshape(shape)
        if self._spec["permuted_qk"]:
            if key.endswith("self_attn.q_proj.weight"):
                array = unpermute_rows(array, self.hf_config["num_attention_heads"])
            elif key.endswith("self_attn.k_proj.weight"):
                array = unpermute_rows(array, self.hf_config["num_key_value_heads"])
        return array

    def _read(self, tensor) -> bytes:
        size = int(tensor.n_bytes)
        with open(self.path, "rb", buffering=0) as f:
            data = os.pread(f.fileno(), size, int(tensor.data_offset))
        if len(data) != size:
            raise ValueError(
                f"{self.path}: tensor {tensor.name} is cut short ({len(data)} of {size} bytes at "
                f"offset {int(tensor.data_offset)}): the file is truncated"
            )
        return data

    def _field(self, key: str) -> Any:
        field = self._reader.fields.get(key)
        return None if field is None else field.contents()

    def _config(self) -> dict[str, Any]:
        prefix = f"{self.arch}."
        meta = {
            k[len(prefix) :]: self._field(k) for k in self._reader.fields if k.startswith(prefix)
        }
        unknown = sorted(set(meta) - set(_CONFIG_KEYS) - set(_CHECKED_KEYS))
        if unknown:
            raise ValueError(
                f"{self.path}: GGUF metadata not supported: {[prefix + k for k in unknown]}"
            )
        config: dict[str, Any] = {"model_type": self.arch, "hidden_act": "silu"}
        config.update(self._spec["config"])
        config.update({_CONFIG_KEYS[k]: v for k, v in meta.items() if k in _CONFIG_KEYS})
        config.setdefault("num_key_value_heads", config["num_attention_heads"])
        config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
        if "vocab_size" not in config:
            config["vocab_size"] = int(self._tensors["model.embed_tokens.weight"].shape[1])
        for key in ("rope.dimension_count", "attention.value_length"):
            if meta.get(key, config["head_dim"]) != config["head_dim"]:
                raise ValueError(
                    f"{self.path}: GGUF {prefix}{key}={meta[key]} differs from head_dim "
                    f"{config['head_dim']} (partial rotary / different value width are not "
                    "supported)"
                )
        scaling = meta.get("rope.scaling.type", "none")
        if scaling == "linear":
            config["rope_scaling"] = {"rope_type": "linear", "factor": meta["rope.scaling.factor"]}
        elif scaling != "none":
            raise ValueError(
                f"{self.path}: GGUF rope scaling {scaling!r} is not supported (none, linear)"
            )
        config["tie_word_embeddings"] = "lm_head.weight" not in self._tensors
        for field, name in _TOKEN_IDS.items():
            value = self._field(f"tokenizer.ggml.{name}_token_id")
            if value is not None:
                config[field] = int(value)
        return config


@functools.lru_cache(maxsize=4)
def _open_reader(path: str, mtime_ns: int, size: int):
    """GGUFReader parses every metadata field on open (the tokenizer's ~100k strings: seconds even
    for a small model), so the last few files stay open, memory-mapped read-only; a changed file
    (mtime, size) is opened anew. load_layer after from_pretrained reuses the parse."""
    import gguf

    return gguf.GGUFReader(path)


def _hf_name(gguf_name: str, extra: dict[str, str]) -> str | None:
    block = _BLOCK.fullmatch(gguf_name)
    if block is None:
        return _NAMES.get(gguf_name)
    key = f"blk.{{}}.{block.group(2)}"
    pattern = _NAMES.get(key, extra.get(key))
    return None if pattern is None else pattern.format(block.group(1))
