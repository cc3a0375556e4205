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
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

_BEST_SUBDIR = "best"
_MODES = ("max", "min")


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
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(_jsonable(meta))
        )
        if not self._manager.save(step, args=args, force=force):
            logging.info("Checkpoint step %d not saved: latest is %s.", step, self.latest_step())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict]:
        """``(state, meta)`` of checkpoint ``step`` (default: the latest)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        return _restore(self._manager, step, abstract_state)

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
        manager.save(
            counter,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
        )
        return True

    def restore_best(self, abstract_state) -> tuple[Any, dict]:
        """``(state, {"step": train step, "metrics": metrics})`` of the best checkpoint."""
        manager = self._require_best()
        counter = manager.latest_step()
        if counter is None:
            raise FileNotFoundError(f"No best checkpoint in {self.directory / _BEST_SUBDIR}.")
        return _restore(manager, counter, abstract_state)

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


def _restore(manager: ocp.CheckpointManager, step: int, abstract_state) -> tuple[Any, dict]:
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
        ),
    )
    return restored.state, restored.meta


def _restore_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
