"""A tiny fake snapshot of the hub dataset repository nyu-mll/glue, for offline GLUE tests.

`write_glue_snapshot(root)` writes what `huggingface-cli download nyu-mll/glue --repo-type dataset
--local-dir root` would, in miniature: one folder per config with parquet files named as on the
hub (`cola/train-00000-of-00001.parquet`), and a README.md whose YAML front matter has the
repository's `configs:` block (config_name + data_files: split / path glob) and its
`dataset_info:` block (features with the class-label names, split sizes), so that
`datasets.load_dataset(root, "cola", split="train")` reads it as it reads the hub.

Configs, split names, column names and label types are the hub's. Labelled splits get random
labels (binary tasks: a positive word for 1, a negative word for 0, so a tiny model can learn
something); the hidden test splits have label -1 and an `idx` that is a permutation of 0..n-1
which is NOT the row order, so that code using row numbers instead of `idx` is caught. Texts are
short sequences of the words of the tiny BERT's vocabulary (tests/conftest.py), deterministic in
`seed`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path

import yaml

from tests.conftest import FILLER, NEGATIVE, POSITIVE

_SPLITS = ("train", "validation", "test")
_MNLI_SPLITS = (
    "train",
    "validation_matched",
    "validation_mismatched",
    "test_matched",
    "test_mismatched",
)
_NLI = ("entailment", "neutral", "contradiction")

# config -> (text columns, label names (None: a float score in [0, 5]), split names), as on the hub.
GLUE_CONFIGS = {
    "cola": (("sentence",), ("unacceptable", "acceptable"), _SPLITS),
    "sst2": (("sentence",), ("negative", "positive"), _SPLITS),
    "mrpc": (("sentence1", "sentence2"), ("not_equivalent", "equivalent"), _SPLITS),
    "stsb": (("sentence1", "sentence2"), None, _SPLITS),
    "qqp": (("question1", "question2"), ("not_duplicate", "duplicate"), _SPLITS),
    "mnli": (("premise", "hypothesis"), _NLI, _MNLI_SPLITS),
    "qnli": (("question", "sentence"), ("entailment", "not_entailment"), _SPLITS),
    "rte": (("sentence1", "sentence2"), ("entailment", "not_entailment"), _SPLITS),
    "wnli": (("sentence1", "sentence2"), ("not_entailment", "entailment"), _SPLITS),
    "ax": (("premise", "hypothesis"), _NLI, ("test",)),
}


def is_hidden(split: str) -> bool:
    """Whether a GLUE split's labels are hidden (-1): the test splits."""
    return split.startswith("test")


def parquet_name(config: str, split: str) -> str:
    """The file of one split inside the snapshot, named as on the hub."""
    return f"{config}/{split}-00000-of-00001.parquet"


def _sentence(rng: random.Random, label: int | None) -> str:
    words = rng.choices(FILLER, k=rng.randint(2, 7))
    if label is not None:  # a binary task's cue word
        words.append(rng.choice(POSITIVE if label == 1 else NEGATIVE))
    rng.shuffle(words)
    return " ".join(words)


def _features(text_columns, label_names):
    import datasets

    features = {column: datasets.Value("string") for column in text_columns}
    if label_names is None:
        features["label"] = datasets.Value("float32")
    else:
        features["label"] = datasets.ClassLabel(names=list(label_names))
    features["idx"] = datasets.Value("int32")
    return datasets.Features(features)


def _columns(rng: random.Random, text_columns, label_names, split: str, rows: int) -> dict:
    hidden = is_hidden(split)
    if hidden:
        labels = [-1.0 if label_names is None else -1] * rows
        idx = list(range(rows))
        while idx == sorted(idx) and rows > 1:  # never the row order
            rng.shuffle(idx)
    elif label_names is None:
        labels = [round(rng.uniform(0.0, 5.0), 2) for _ in range(rows)]
        idx = list(range(rows))
    else:
        labels = [rng.randrange(len(label_names)) for _ in range(rows)]
        idx = list(range(rows))
    binary = label_names is not None and len(label_names) == 2
    columns = {column: [] for column in text_columns}
    for label in labels:
        for position, column in enumerate(text_columns):
            cue = label if binary and position == 0 and not hidden else None
            columns[column].append(_sentence(rng, cue))
    columns["label"] = labels
    columns["idx"] = idx
    return columns


def _readme(sizes: dict) -> str:
    configs, info = [], []
    for config, (text_columns, label_names, splits) in GLUE_CONFIGS.items():
        configs.append(
            {
                "config_name": config,
                "data_files": [{"split": s, "path": f"{config}/{s}-*"} for s in splits],
            }
        )
        features = [{"name": c, "dtype": "string"} for c in text_columns]
        if label_names is None:
            features.append({"name": "label", "dtype": "float32"})
        else:
            names = {str(i): name for i, name in enumerate(label_names)}
            features.append({"name": "label", "dtype": {"class_label": {"names": names}}})
        features.append({"name": "idx", "dtype": "int32"})
        info.append(
            {
                "config_name": config,
                "features": features,
                "splits": [
                    {
                        "name": s,
                        "num_bytes": sizes[config, s][1],
                        "num_examples": sizes[config, s][0],
                    }
                    for s in splits
                ],
            }
        )
    front = yaml.safe_dump(
        {
            "language": ["en"],
            "license": "other",
            "task_categories": ["text-classification"],
            "pretty_name": "GLUE (General Language Understanding Evaluation benchmark)",
            "configs": configs,
            "dataset_info": info,
        },
        sort_keys=False,
    )
    return f"---\n{front}---\n\n# A tiny fake GLUE snapshot for tests\n"


def write_glue_snapshot(
    root: Path, rows: int = 24, seed: int = 0, *, sizes: Mapping[tuple[str, str], int] | None = None
) -> Path:
    """Writes the fake nyu-mll/glue snapshot under `root` (`rows` rows per split) and returns
    `root`, ready for `datasets.load_dataset(root, config, split=...)` or data.hub_path.

    sizes: (config, split) -> rows, for splits of another size; e.g. the registry's MNLI keeps
    the last 9832 training rows for validation, so its train split needs more than that:
    `sizes={("mnli", "train"): 9840}`.
    """
    import datasets
    import pyarrow.parquet

    root = Path(root)
    rng = random.Random(seed)
    written = {}
    unknown = set(sizes or {}) - {
        (c, s) for c, (_, _, splits) in GLUE_CONFIGS.items() for s in splits
    }
    if unknown:
        raise ValueError(f"sizes for unknown (config, split) {sorted(unknown)}")
    for config, (text_columns, label_names, splits) in GLUE_CONFIGS.items():
        (root / config).mkdir(parents=True, exist_ok=True)
        features = _features(text_columns, label_names)
        for split in splits:
            n = (sizes or {}).get((config, split), rows)
            columns = _columns(rng, text_columns, label_names, split, n)
            path = root / parquet_name(config, split)
            # The table keeps the features (class-label names) in its schema metadata, as the
            # hub's parquet files do.
            table = datasets.Dataset.from_dict(columns, features=features).data.table
            pyarrow.parquet.write_table(table, path)
            written[config, split] = (n, path.stat().st_size)
    (root / "README.md").write_text(_readme(written), encoding="utf-8")
    return root
