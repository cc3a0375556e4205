"""Gradient-free transfer of PEFT modules from a small model to a large one through a pruned bridge
(Jin, Zhang, Zong, EMNLP 2023; shared/spec/bridge.md).

mapping.py: which SLM layer serves each LLM layer, and the shared-tokenizer check;
fisher.py: the LLM's empirical Fisher importance on task data, one layer at a time;
prune.py: the kept dimensions, heads and units, and the bridge checkpoint built from them.
"""

from pifi_jax.bridge.fisher import FisherScores, fisher_scores, reduce_layer
from pifi_jax.bridge.mapping import (
    check_same_tokenizer,
    depth_map,
    served_layers,
    write_depth_map,
)
from pifi_jax.bridge.prune import (
    BridgeSizes,
    Selection,
    bridge_config,
    bridge_sizes,
    prune,
    save_bridge,
    select,
)

__all__ = [
    "BridgeSizes",
    "FisherScores",
    "Selection",
    "bridge_config",
    "bridge_sizes",
    "check_same_tokenizer",
    "depth_map",
    "fisher_scores",
    "prune",
    "reduce_layer",
    "save_bridge",
    "select",
    "served_layers",
    "write_depth_map",
]
