"""Checkpoints of the train state with orbax: the latest few for resuming, and the best one.

Layout::

    <directory>/<step>/state   the state pytree (step, trainable params, optimizer state, rng)
    <directory>/<step>/meta    JSON: data position, early-stopping counters, metrics, ...
    <directory>/best/<n>/...   the single best checkpoint so far; its meta holds the train step

Saving is synchronous: a save has finished (or failed) when ``save`` returns, so nothing is left
to wait for at exit and the state arrays may be donated to the next step right away. Orbax writes
each checkpoint into ``<step>.orbax-checkpoint-tmp-*`` and renames it when complete, so a process
killed mid-save leaves the previous checkpoint intact; leftover temporary directories are never
listed as steps and are deleted when the next ``Checkpointer`` opens the directory (which
therefore must have one writer at a time).

Restoring goes through an abstract state (``jax.ShapeDtypeStruct`` leaves, with ``.sharding``
where the arrays are sharded) so each array is read straight into its final sharding; the
abstract tree's structure (including optax's namedtuples) is the structure returned.

The best checkpoint is numbered by a counter of improvements rather than by train step, so a run
resumed from an earlier step can still replace it atomically (save the new one, then delete the
old).

Faults:

- A save that fails (a full disk, a lost mount, ...) raises an error naming the step and the
  directory; what it had written stays in its temporary directory, so the latest complete
  checkpoint is still the one before it.
- Every checkpoint's meta carries a digest of each saved array (position-weighted sums of its
  bits, one pass on device), checked at restore: orbax and tensorstore catch a truncated file,
  but read a flipped bit in array data back without complaint; the digests catch both.
- ``restore()`` of the latest step (what a resumed run calls) falls back to the newest older step
  that reads and checks cleanly, with a warning naming the unreadable step directories, which are
  moved to ``<directory>/corrupted/`` (unless read-only) so the run can save those steps again.
  An explicit ``step``, or no usable step at all, is an error naming the directories.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

_BEST_SUBDIR = "best"
_CORRUPTED_SUBDIR = "corrupted"
_MODES = ("max", "min")
# Key of the saved arrays' digests in a checkpoint's meta (stripped from what restore returns).
_DIGESTS = "_digests"


def has_checkpoints(directory: str | os.PathLike) -> bool:
    """Whether `directory` (a run's checkpoints/) holds a step or a best checkpoint, complete or
    half-written: the run there has trained."""
    directory = Path(directory)
    for where in (directory, directory / _BEST_SUBDIR):
        if where.is_dir() and any(p.name.split(".")[0].isdigit() for p in where.iterdir()):
            return True
    return False


def _unsigned(x: jax.Array) -> jax.Array:
    """The bits of `x` as a flat uint32 vector (8-byte items as two words)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    words = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, words).astype(jnp.uint32).reshape(-1)


@jax.jit
def _device_digests(leaves: list) -> list:
    """Two uint32 sums per leaf, each word weighted by an odd function of its position, so that
    any one changed bit (and any moved word) changes them; exact and order-free (mod 2**32), so
    the same on every sharding."""
    out = []
    for leaf in leaves:
        bits = _unsigned(leaf)
        i = jnp.arange(bits.size, dtype=jnp.uint32)
        first = jnp.sum(bits * (2 * i + 1), dtype=jnp.uint32)
        second = jnp.sum((bits ^ jnp.uint32(0x9E3779B9)) * (i * jnp.uint32(0x85EBCA6B) | 1))
        out.append(jnp.stack([first, second.astype(jnp.uint32)]))
    return out


def _digests(tree) -> list[str]:
    """Sorted "dtype[shape]:hex" of every array leaf: independent of the tree's structure (a
    restore without an abstract tree returns dicts where optax saved namedtuples)."""
    leaves = [jnp.asarray(x) for x in jax.tree.leaves(tree)]
    leaves = [x for x in leaves if x.dtype.itemsize <= 8 and not jnp.iscomplexobj(x)]
    sums = jax.device_get(_device_digests(leaves))
    return sorted(
        f"{x.dtype}{list(x.shape)}:{int(s[0]):08x}{int(s[1]):08x}"
        for x, s in zip(leaves, sums, strict=True)
    )


def _manager(directory: Path, max_to_keep: int, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(n=max_to_keep),
        enable_async_checkpointing=False,
        # A reader must leave a writer's half-written checkpoint alone.
        cleanup_tmp_directories=not read_only,
    )
    return ocp.CheckpointManager(directory, options=options)


def _jsonable(tree: dict) -> dict:
    # Metrics often arrive as numpy or jax scalars, which the json module refuses.
    def convert(leaf):
        if isinstance(leaf, np.generic | np.ndarray | jax.Array):
            return np.asarray(leaf).tolist()
        return leaf

    return jax.tree.map(convert, tree)


class Checkpointer:
    """Latest-``max_to_keep`` checkpoints plus, when ``best_metric`` is given, the best one."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int = 2,
        best_metric: str | None = None,
        best_mode: str = "max",
        read_only: bool = False,
    ):
        """read_only: open for restoring only (e.g. predicting while the run still trains): a
        writer's temporary directories are left alone, and nothing may be saved."""
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be at least 1, got {max_to_keep}.")
        if best_mode not in _MODES:
            raise ValueError(f"best_mode must be one of {_MODES}, got {best_mode!r}.")
        self.directory = Path(directory).absolute()
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.read_only = read_only
        self._manager = _manager(self.directory, max_to_keep, read_only)
        self._best_manager = (
            _manager(self.directory / _BEST_SUBDIR, 1, read_only)
            if best_metric is not None
            else None
        )

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> None:
        """Write ``state`` and the JSON-able ``meta`` as checkpoint ``step``.

        A step not newer than the latest checkpoint is skipped (it is already saved, e.g. a final
        save right after a periodic one) unless ``force``; an existing step is never overwritten.
        """
        self._refuse_if_read_only()
        meta = {**_jsonable(meta), _DIGESTS: _digests(state)}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        if not _save(self._manager, self.directory, step, args, force=force):
            logging.info("Checkpoint step %d not saved: latest is %s.", step, self.latest_step())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict]:
        """``(state, meta)`` of checkpoint ``step`` (default: the latest that reads and checks
        cleanly: a damaged latest step falls back to an older one, see the module docstring)."""
        if step is not None:
            return _restore(self._manager, self.directory, step, abstract_state)
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        failures = []
        for candidate in steps:
            try:
                restored = _restore(self._manager, self.directory, candidate, abstract_state)
            except CorruptCheckpointError as error:
                failures.append((candidate, error))
                continue
            if failures:
                self._set_aside([s for s, _ in failures], candidate, failures)
            return restored
        raise CorruptCheckpointError(
            f"no usable checkpoint in {self.directory}:\n"
            + "\n".join(f"  {error}" for _, error in failures)
        )

    def _set_aside(self, steps: list[int], used: int, failures) -> None:
        """Warns of unreadable steps newer than `used` and moves them out of the way (a run
        resumed from `used` saves those steps again)."""
        moved = ""
        if not self.read_only:
            aside = self.directory / _CORRUPTED_SUBDIR
            if jax.process_index() == 0:
                aside.mkdir(exist_ok=True)
                for step in steps:
                    target = aside / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
                    (self.directory / str(step)).rename(target)
            if jax.process_count() > 1:  # every process sees the steps gone before going on
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("pifi_jax checkpoints set aside")
            self._manager.reload()
            moved = f"; moved to {aside}"
        logging.warning(
            "Checkpoint step %s unreadable, restored step %d instead%s:\n%s",
            ", ".join(map(str, steps)),
            used,
            moved,
            "\n".join(f"  {error}" for _, error in failures),
        )

    def restore_subtree(self, key: str, abstract, step: int | None = None) -> tuple[Any, int]:
        """``(state[key], step)`` of checkpoint ``step`` (default: the latest), reading only that
        part of the saved state (e.g. the parameters without the optimizer state)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        restored = ocp.PyTreeCheckpointer().restore(
            self.directory / str(step) / "state",
            args=ocp.args.PyTreeRestore(
                {key: abstract},
                restore_args=ocp.checkpoint_utils.construct_restore_args({key: abstract}),
                partial_restore=True,
            ),
        )
        return restored[key], step

    def save_best(self, step: int, state, metrics: dict) -> bool:
        """Keep ``state`` as the best checkpoint if ``metrics[best_metric]`` beats the stored best.

        Returns whether it did. A NaN metric never counts as better.
        """
        self._refuse_if_read_only()
        manager = self._require_best()
        if self.best_metric not in metrics:
            raise ValueError(
                f"best_metric {self.best_metric!r} not among the metrics {sorted(metrics)}."
            )
        value = float(metrics[self.best_metric])
        if math.isnan(value):
            return False
        previous = manager.latest_step()
        if previous is not None:
            best = _restore_meta(manager, previous)["metrics"][self.best_metric]
            if not (value > best if self.best_mode == "max" else value < best):
                return False
        counter = 0 if previous is None else previous + 1
        meta = {"step": step, "metrics": _jsonable(metrics)}
        meta[_DIGESTS] = _digests(state)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        _save(manager, self.directory / _BEST_SUBDIR, counter, args, train_step=step)
        return True

    def restore_best(self, abstract_state) -> tuple[Any, dict]:
        """``(state, {"step": train step, "metrics": metrics})`` of the best checkpoint."""
        manager = self._require_best()
        counter = manager.latest_step()
        if counter is None:
            raise FileNotFoundError(f"No best checkpoint in {self.directory / _BEST_SUBDIR}.")
        return _restore(manager, self.directory / _BEST_SUBDIR, counter, abstract_state)

    def wait(self) -> None:
        for manager in self._managers():
            manager.wait_until_finished()

    def close(self) -> None:
        for manager in self._managers():
            manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _managers(self) -> list[ocp.CheckpointManager]:
        return [m for m in (self._manager, self._best_manager) if m is not None]

    def _refuse_if_read_only(self) -> None:
        if self.read_only:
            raise PermissionError(f"{self.directory} was opened read-only; nothing is saved")

    def _require_best(self) -> ocp.CheckpointManager:
        if self._best_manager is None:
            raise ValueError("This Checkpointer was created without best_metric.")
        return self._best_manager


class CorruptCheckpointError(ValueError):
    """A checkpoint that cannot be read back as saved (truncated, corrupted, incomplete)."""


def _save(manager, directory: Path, step: int, args, *, force=False, train_step=None) -> bool:
    """manager.save, its failure turned into an error naming the step and the directory."""
    try:
        return manager.save(step, args=args, force=force)
    except Exception as error:
        what = (
            f"checkpoint {step}" if train_step is None else f"best checkpoint (step {train_step})"
        )
        message = (
            f"saving {what} in {directory} failed: {error}. Nothing of it was committed; "
            f"the latest complete checkpoint there is still {manager.latest_step()}."
        )
        if isinstance(error, OSError):
            raise OSError(error.errno, message) from error
        raise RuntimeError(message) from error


def _restore(
    manager: ocp.CheckpointManager, directory: Path, step: int, abstract_state
) -> tuple[Any, dict]:
    """(state, meta) of `step`, its arrays checked against the digests saved with them."""
    where = directory / str(step)
    _check_same_params(where, abstract_state)
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        state, meta = restored.state, dict(restored.meta)
    except Exception as error:
        if not where.is_dir():
            raise FileNotFoundError(f"No checkpoint {step} in {directory}.") from error
        raise CorruptCheckpointError(f"checkpoint {where} cannot be read: {error}") from error
    saved = meta.pop(_DIGESTS, None)
    if saved is not None and sorted(saved) != _digests(state):
        raise CorruptCheckpointError(
            f"checkpoint {where} is corrupted: its arrays do not match the digests saved with "
            "them (a file under it changed after the save)"
        )
    return state, meta


def _key_name(entry) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def _shapes(tree) -> dict[str, tuple]:
    """{"a/b/c": shape} of a tree's array leaves (arrays, ShapeDtypeStructs, orbax metadata)."""
    return {
        "/".join(_key_name(e) for e in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        if hasattr(leaf, "shape")
    }


def _check_same_params(where: Path, abstract_state) -> None:
    """Refuses (a ValueError, not corruption: nothing is set aside) a checkpoint whose parameters
    are another model's than `abstract_state`'s: other leaves or other shapes, as when the
    checkpoint of model.path was replaced by another architecture since the run began. A step
    whose metadata cannot be read is left to the restore (and its corruption handling)."""
    if not isinstance(abstract_state, dict) or "params" not in abstract_state:
        return
    try:
        saved = ocp.StandardCheckpointHandler().metadata(epath.Path(where / "state"))
        saved = _shapes(getattr(saved, "tree", saved)["params"])
    except Exception:  # unreadable metadata: the restore reports it
        return
    wanted = _shapes(abstract_state["params"])
    if saved == wanted:
        return
    differ = [
        f"{path}: {saved[path]} saved, {wanted[path]} now"
        for path in sorted(saved.keys() & wanted.keys())
        if saved[path] != wanted[path]
    ]
    differ += [f"{path}: not in this model" for path in sorted(saved.keys() - wanted.keys())]
    differ += [f"{path}: not in the checkpoint" for path in sorted(wanted.keys() - saved.keys())]
    raise ValueError(
        f"checkpoint {where} holds another model's parameters than this run builds "
        f"({len(saved)} saved, {len(wanted)} now; {len(differ)} differ, e.g. "
        + "; ".join(differ[:3])
        + "). Was the checkpoint that model.path names replaced since the run began? Train "
        "in another --workdir, or restore that checkpoint."
    )


def _restore_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    return {k: v for k, v in meta.items() if k != _DIGESTS}
