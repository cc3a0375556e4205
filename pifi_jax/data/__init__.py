"""Data: task registry, sources (hub / tfds / local files / offline RT), tokenization, batching.

task = get_task("rt")
examples = load_examples(task, "train")                   # validated texts + labels
encoded = encode(load_tokenizer(path), examples, 128)     # variable-length int32 ids
batcher = Batcher(encoded, 32, (32, 64, 128), shuffle=True, seed=0, drop_remainder=True)
for batch in batcher.batches(epoch=0): ...                # static shapes, weights for padding

Task "local" (your own files, no registry entry): `task_for_config(config)` reads the label set
from the training file (pifi_jax.data.local).

Generation tasks (`GenerationTask`: source -> target text) encode with `encode_generation` in the
causal_lm or seq2seq layout; their Batcher pads targets too (see batching.py).

Extractive QA tasks (`SpanTask`: question + context -> a span of the context; squad_v1 from the
hub, squad_spans offline) encode with `encode_spans` into overlapping windows (data.spans).

GLUE suite (`glue`): the nine tasks, their hidden test splits, the gluebenchmark.com submission
archive and the score table (pifi_jax.data.glue).
"""

from pifi_jax.data import glue, sources
from pifi_jax.data.batching import Batcher
from pifi_jax.data.local import resolve_task, task_for_config
from pifi_jax.data.sources import Examples, load_examples, parse_column_map
from pifi_jax.data.spans import encode_spans
from pifi_jax.data.tasks import TASKS, GenerationTask, SpanTask, TaskSpec, get_task
from pifi_jax.data.tokenize import Encoded, encode, encode_generation, load_tokenizer

__all__ = [
    "TASKS",
    "Batcher",
    "Encoded",
    "Examples",
    "GenerationTask",
    "SpanTask",
    "TaskSpec",
    "encode",
    "encode_generation",
    "encode_spans",
    "get_task",
    "glue",
    "load_examples",
    "load_tokenizer",
    "parse_column_map",
    "resolve_task",
    "sources",
    "task_for_config",
]
