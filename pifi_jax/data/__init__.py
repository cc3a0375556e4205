"""Data: task registry, sources (hub / tfds / local files / offline RT), tokenization, batching.

task = get_task("rt")
examples = load_examples(task, "train")                   # validated texts + labels
encoded = encode(load_tokenizer(path), examples, 128)     # variable-length int32 ids
batcher = Batcher(encoded, 32, (32, 64, 128), shuffle=True, seed=0, drop_remainder=True)
for batch in batcher.batches(epoch=0): ...                # static shapes, weights for padding
"""

from pifi_jax.data.batching import Batcher
from pifi_jax.data.sources import Examples, load_examples
from pifi_jax.data.tasks import TASKS, TaskSpec, get_task
from pifi_jax.data.tokenize import Encoded, encode, load_tokenizer

__all__ = [
    "TASKS",
    "Batcher",
    "Encoded",
    "Examples",
    "TaskSpec",
    "encode",
    "get_task",
    "load_examples",
    "load_tokenizer",
]
