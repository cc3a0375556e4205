"""Deterministic, length-bucketed batches with static shapes, split across processes.

Shapes: every batch is padded to a length from `buckets` (the smallest one that fits the longest
sequence of the GLOBAL batch, so all processes agree and jit compiles once per bucket) and to the
full batch size (padding rows carry weight 0, so a partial eval batch keeps the static shape).

Order: epoch e of a training run is a pure function of (seed, e). The examples are permuted, grouped
into chunks of 64 batches, each chunk is sorted by length (little padding) and cut into batches, and
the batch order is shuffled with the same generator. `batches(e, start=k)` therefore continues an
interrupted epoch exactly at batch k, which is all a checkpoint must remember about the data.

Processes: `batch_size` is global; process p yields rows [p*b/P, (p+1)*b/P) of each global batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from pifi_jax.data.tokenize import Encoded

SORT_CHUNK_BATCHES = 64


class Batcher:
    def __init__(
        self,
        encoded: Encoded,
        batch_size: int,
        buckets: Sequence[int],
        *,
        shuffle: bool,
        seed: int,
        drop_remainder: bool,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if batch_size < 1 or batch_size % process_count:
            raise ValueError(
                f"global batch size {batch_size} must be a positive multiple of the process "
                f"count {process_count}"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        self.buckets = np.array(sorted(set(buckets)), dtype=np.int64)
        if not len(self.buckets) or self.buckets[0] < 1:
            raise ValueError(f"buckets must be positive lengths, got {list(buckets)}")
        self.lengths = np.array([len(ids) for ids in encoded.input_ids], dtype=np.int64)
        if len(self.lengths) and self.lengths.max() > self.buckets[-1]:
            longest = int(np.argmax(self.lengths))
            raise ValueError(
                f"example {longest} has {self.lengths[longest]} tokens but the largest bucket is "
                f"{self.buckets[-1]}: the largest bucket must be >= encode()'s max_length"
            )
        self.encoded = encoded
        self.batch_size = batch_size
        self.local_size = batch_size // process_count
        self.process_index = process_index
        self.shuffle = shuffle
        self.seed = seed
        self.drop_remainder = drop_remainder

    def num_batches(self) -> int:
        """Global batches per epoch."""
        count, rest = divmod(len(self.lengths), self.batch_size)
        return count + (1 if rest and not self.drop_remainder else 0)

    def _epoch_order(self, epoch: int) -> list[np.ndarray]:
        """Example indices of each global batch of `epoch`, in the order they are yielded."""
        size, n = self.batch_size, len(self.lengths)
        if not self.shuffle:
            order = np.arange(self.num_batches() * size if self.drop_remainder else n)
            return [order[i : i + size] for i in range(0, len(order), size)]
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n)
        if self.drop_remainder:
            order = order[: self.num_batches() * size]  # a different random remainder each epoch
        chunk = SORT_CHUNK_BATCHES * size
        batches = []
        for begin in range(0, len(order), chunk):
            part = order[begin : begin + chunk]
            part = part[np.argsort(self.lengths[part], kind="stable")]
            batches += [part[i : i + size] for i in range(0, len(part), size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def batches(self, epoch: int, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """This process's share of global batches `start`, `start + 1`, ... of `epoch`."""
        order = self._epoch_order(epoch)
        if not 0 <= start <= len(order):
            raise ValueError(f"start {start} not in [0, {len(order)}]")
        for indices in order[start:]:
            yield self._assemble(indices)

    def _assemble(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        # The length is decided on the global batch so every process pads to the same shape.
        length = int(self.buckets[np.searchsorted(self.buckets, self.lengths[indices].max())])
        rows = self.local_size
        mine = indices[self.process_index * rows : (self.process_index + 1) * rows]
        labels = self.encoded.labels
        batch = {
            "input_ids": np.full((rows, length), self.encoded.pad_id, np.int32),  # [b, L]
            "attention_mask": np.zeros((rows, length), np.int32),  # [b, L]
            "token_type_ids": np.zeros((rows, length), np.int32),  # [b, L]
            "labels": np.zeros((rows,), labels.dtype),  # [b]
            "weights": np.zeros((rows,), np.float32),  # [b]; 0 marks a padding row
        }
        for row, index in enumerate(mine):
            size = self.lengths[index]
            batch["input_ids"][row, :size] = self.encoded.input_ids[index]
            batch["attention_mask"][row, :size] = 1
            batch["token_type_ids"][row, :size] = self.encoded.token_type_ids[index]
        batch["labels"][: len(mine)] = labels[mine]
        batch["weights"][: len(mine)] = 1.0
        return batch
