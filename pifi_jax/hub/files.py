"""Finding a checkpoint (local directory or hub id) and reading it one tensor at a time.

Supported layouts: model.safetensors, a sharded model.safetensors.index.json, pytorch_model.bin
and its sharded index. Tensors come back as numpy arrays (bfloat16 through ml_dtypes), so a large
checkpoint never has to sit in memory whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np

from pifi_jax import assets

WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
_HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors", "tokenizer*"]


def resolve_checkpoint(path_or_hub_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory as is; `asset:NAME` an offline asset; otherwise a hub id, downloaded."""
    if str(path_or_hub_id).startswith(assets.PREFIX):
        return assets.locate(str(path_or_hub_id))
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; pass the checkpoint directory that holds config.json")
    name = str(path_or_hub_id)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"checkpoint directory {name} does not exist")
    try:
        from huggingface_hub import list_repo_files, snapshot_download

        patterns = list(_HUB_PATTERNS)
        if not any(f.endswith(".safetensors") for f in list_repo_files(name, revision=revision)):
            patterns.append("*.bin")
        return Path(snapshot_download(name, revision=revision, allow_patterns=patterns))
    except Exception as err:  # network errors come in many types; the message names the cause
        raise FileNotFoundError(
            f"{name!r} is not a local directory and could not be fetched from the Hugging Face hub "
            f"({type(err).__name__}: {err})"
        ) from err


def read_config(directory: Path) -> dict:
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{config_file} is missing: a checkpoint directory needs config.json"
        )
    with open(config_file, encoding="utf-8") as f:
        return json.load(f)


class CheckpointReader:
    """Lists the tensors of a checkpoint directory and reads them one by one.

    `opened_files` records every weight file actually opened, so callers (and tests) can check
    that loading part of a model touched only the shards that hold it.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.opened_files: set[str] = set()
        self._handles: dict[str, object] = {}
        present = [f for f in WEIGHT_FILES if (self.directory / f).is_file()]
        if not present:
            raise FileNotFoundError(
                f"no weights in {self.directory}: expected one of {', '.join(WEIGHT_FILES)}"
            )
        self.layout = present[0]
        if self.layout.endswith(".index.json"):
            with open(self.directory / self.layout, encoding="utf-8") as f:
                self._file_of = dict(json.load(f)["weight_map"])
        else:
            self._file_of = {key: self.layout for key in self._open(self.layout).keys()}

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def get(self, key: str) -> np.ndarray:
        """Reads one tensor as a numpy array in its stored dtype."""
        handle = self._open(self._file_of[key])
        if isinstance(handle, dict):  # a torch state dict
            return _torch_to_numpy(handle[key])
        # The "flax" framework reads bfloat16, which safetensors' numpy reader cannot; keep it on the CPU.
        with jax.default_device(jax.local_devices(backend="cpu")[0]):
            return np.asarray(handle.get_tensor(key))

    def _open(self, filename: str):
        if filename not in self._handles:
            path = self.directory / filename
            self.opened_files.add(filename)
            if filename.endswith(".safetensors"):
                from safetensors import safe_open

                self._handles[filename] = safe_open(str(path), framework="flax")
            else:
                self._handles[filename] = _torch_load(path)
        return self._handles[filename]


def _torch_load(path: Path) -> dict:
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            f"{path} is a PyTorch checkpoint; reading it needs torch (pip install 'pifi_jax[torch]')"
        ) from err
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _torch_to_numpy(tensor) -> np.ndarray:
    import ml_dtypes
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()
