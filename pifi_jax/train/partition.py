"""The trainer's view of `pifi_jax.partition` (freezing by path rules), which lives below every
package that needs it (peft uses it too) so that nothing below `train/` imports `train/`."""

from pifi_jax.partition import (
    LABELS,
    flatten,
    label_leaves,
    merge_params,
    partition_table,
    split_params,
    unflatten,
)

__all__ = [
    "LABELS",
    "flatten",
    "label_leaves",
    "merge_params",
    "partition_table",
    "split_params",
    "unflatten",
]
