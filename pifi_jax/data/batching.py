"""Deterministic, length-bucketed batches with static shapes, split across processes.

Shapes: every batch is padded to a length from `buckets` (the smallest one that fits the longest
sequence of the GLOBAL batch, so all processes agree and jit compiles once per bucket) and to the
full batch size (padding rows carry weight 0, so a partial eval batch keeps the static shape).

Order: epoch e of a training run is a pure function of (seed, e). The examples are permuted, grouped
into chunks of 64 batches, each chunk is sorted by length (little padding) and cut into batches, and
the batch order is shuffled with the same generator. `batches(e, start=k)` therefore continues an
interrupted epoch exactly at batch k, which is all a checkpoint must remember about the data.

Processes: `batch_size` is global; process p yields rows [p*b/P, (p+1)*b/P) of each global batch.

What a batch holds depends on the encoding's layout (data.tokenize) and on `generate`:
  classification      input_ids, attention_mask, token_type_ids [b, L]; labels [b] ([b, K] for
                      multi-label)
  causal_lm           input_ids, attention_mask, loss_mask [b, L] right-padded (loss_mask 1 on
                      the target tokens); generate=True: the prompts alone, LEFT-padded (every
                      row's next token lands in the same cache slot)
  seq2seq             input_ids, attention_mask [b, S]; target_ids, target_mask [b, T] padded to
                      the smallest of `target_buckets` that fits (generate=True: sources only)
  span                extractive QA windows (data.spans): input_ids, attention_mask,
                      token_type_ids [b, L]; start_positions, end_positions [b] (index: the
                      window's position)
and always weights [b] (0 on padding rows) and index [b] (the example's position in the split,
-1 on padding rows: scoring looks references up by it).

Packing (`pack=True`, causal_lm training batches only): several examples share a row of at most
the largest bucket's length, one after another, and `attention_mask` holds each one's segment
id 1, 2, ... instead of 1 (0 on padding), which the models read as "attend within your segment,
count positions from its start" (layers.attention). loss_mask is 0 on each segment's first
token, so no target is predicted across a boundary; index is -1 (a row is no single example).
The rows are formed once, from the seed: the examples in a seeded random order, each put into
the fullest row it fits in (best fit); an epoch shuffles and batches the rows, so the number of
batches per epoch is fixed and a resumed run sees the same rows.
"""

from __future__ import annotations

import bisect
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
        target_buckets: Sequence[int] = (),
        generate: bool = False,
        pack: bool = False,
    ):
        if batch_size < 1 or batch_size % process_count:
            raise ValueError(
                f"global batch size {batch_size} must be a positive multiple of the process "
                f"count {process_count}"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        self.layout = encoded.layout
        self.generate = generate
        self.buckets = _buckets(buckets, "buckets")
        if self.layout == "causal_lm" and generate:
            self.lengths = encoded.prompt_lengths.astype(np.int64)
        else:
            self.lengths = np.array([len(ids) for ids in encoded.input_ids], dtype=np.int64)
        _check_fits(self.lengths, self.buckets, "buckets", "tokens")
        self.pack = pack
        self.rows: list[np.ndarray] | None = None  # packing: each row's example indices
        if pack:
            if self.layout != "causal_lm" or generate:
                what = "generation" if generate else f"the {self.layout} layout"
                raise ValueError(
                    f"packing (data.pack) is for causal-LM training batches, not {what}: set "
                    "data.pack=False"
                )
            self.rows = pack_rows(self.lengths, int(self.buckets[-1]), seed)
            self.lengths = np.array([self.lengths[r].sum() for r in self.rows], dtype=np.int64)
        if self.layout == "seq2seq" and not generate:
            self.target_buckets = _buckets(target_buckets, "target_buckets")
            self.target_lengths = np.array([len(t) for t in encoded.target_ids], dtype=np.int64)
            _check_fits(self.target_lengths, self.target_buckets, "target_buckets", "target tokens")
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
        length = _fit(self.buckets, self.lengths[indices])
        rows = self.local_size
        mine = indices[self.process_index * rows : (self.process_index + 1) * rows]
        enc = self.encoded
        batch = {
            "weights": np.zeros((rows,), np.float32),  # [b]; 0 marks a padding row
            "index": np.full((rows,), -1, np.int32),  # [b]; the example's position in the split
        }
        batch["weights"][: len(mine)] = 1.0
        if not self.pack:
            batch["index"][: len(mine)] = mine
        ids = np.full((rows, length), enc.pad_id, np.int32)  # [b, L]
        mask = np.zeros((rows, length), np.int32)  # [b, L]
        batch.update(input_ids=ids, attention_mask=mask)
        if self.layout == "classification":
            types = batch["token_type_ids"] = np.zeros((rows, length), np.int32)  # [b, L]
            # [b], or [b, labels] for multi-label indicators
            batch["labels"] = np.zeros((rows, *enc.labels.shape[1:]), enc.labels.dtype)
            batch["labels"][: len(mine)] = enc.labels[mine]
            for row, index in enumerate(mine):
                size = self.lengths[index]
                ids[row, :size], mask[row, :size] = enc.input_ids[index], 1
                types[row, :size] = enc.token_type_ids[index]
        elif self.layout == "span":
            types = batch["token_type_ids"] = np.zeros((rows, length), np.int32)  # [b, L]
            starts = batch["start_positions"] = np.zeros((rows,), np.int32)  # [b]
            ends = batch["end_positions"] = np.zeros((rows,), np.int32)  # [b]
            for row, index in enumerate(mine):
                size = self.lengths[index]
                ids[row, :size], mask[row, :size] = enc.input_ids[index], 1
                types[row, :size] = enc.token_type_ids[index]
                starts[row], ends[row] = enc.start_positions[index], enc.end_positions[index]
        elif self.layout == "causal_lm" and self.generate:
            for row, index in enumerate(mine):  # prompts, left-padded
                size = self.lengths[index]
                ids[row, length - size :] = enc.input_ids[index][:size]
                mask[row, length - size :] = 1
        elif self.pack:
            loss_mask = batch["loss_mask"] = np.zeros((rows, length), np.int32)  # [b, L]
            for row, packed in enumerate(mine):
                end = 0
                for segment, index in enumerate(self.rows[packed], start=1):
                    begin, end = end, end + len(enc.input_ids[index])
                    ids[row, begin:end], mask[row, begin:end] = enc.input_ids[index], segment
                    # Targets only, and never the segment's first token (the previous
                    # segment's last position would predict it).
                    loss_mask[row, max(begin + enc.prompt_lengths[index], begin + 1) : end] = 1
        elif self.layout == "causal_lm":
            loss_mask = batch["loss_mask"] = np.zeros((rows, length), np.int32)  # [b, L]
            for row, index in enumerate(mine):
                size, start = self.lengths[index], enc.prompt_lengths[index]
                ids[row, :size], mask[row, :size] = enc.input_ids[index], 1
                loss_mask[row, start:size] = 1
        else:  # seq2seq
            for row, index in enumerate(mine):
                size = self.lengths[index]
                ids[row, :size], mask[row, :size] = enc.input_ids[index], 1
            if not self.generate:
                target_length = _fit(self.target_buckets, self.target_lengths[indices])
                targets = np.full((rows, target_length), enc.pad_id, np.int32)  # [b, T]
                target_mask = np.zeros((rows, target_length), np.int32)  # [b, T]
                for row, index in enumerate(mine):
                    size = self.target_lengths[index]
                    targets[row, :size], target_mask[row, :size] = enc.target_ids[index], 1
                batch.update(target_ids=targets, target_mask=target_mask)
        return batch


def pack_rows(lengths: np.ndarray, capacity: int, seed: int) -> list[np.ndarray]:
    """Groups example indices into rows of at most `capacity` tokens: the examples in a random
    order from `seed`, each into the row with the least room that still holds it (best fit; a new
    row when none does). Every example lands in exactly one row, in that order within the row."""
    order = np.random.default_rng([seed, 0x7061636B]).permutation(len(lengths))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for index in order:
        size = int(lengths[index])
        at = bisect.bisect_left(free, (size, -1))
        if at == len(free):
            rows.append([])
            room, row = capacity, len(rows) - 1
        else:
            room, row = free.pop(at)
        rows[row].append(int(index))
        if room > size:
            bisect.insort(free, (room - size, row))
    return [np.array(r, dtype=np.int64) for r in rows]


def _buckets(lengths: Sequence[int], name: str) -> np.ndarray:
    buckets = np.array(sorted(set(lengths)), dtype=np.int64)
    if not len(buckets) or buckets[0] < 1:
        raise ValueError(f"{name} must be positive lengths, got {list(lengths)}")
    return buckets


def _check_fits(lengths: np.ndarray, buckets: np.ndarray, name: str, what: str) -> None:
    if len(lengths) and lengths.max() > buckets[-1]:
        longest = int(np.argmax(lengths))
        raise ValueError(
            f"example {longest} has {lengths[longest]} {what} but the largest of {name} is "
            f"{buckets[-1]}: the largest bucket must be >= the encoding's maximum length"
        )


def _fit(buckets: np.ndarray, lengths: np.ndarray) -> int:
    """The smallest bucket that holds the longest of `lengths`."""
    return int(buckets[np.searchsorted(buckets, lengths.max())])
