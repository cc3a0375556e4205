"""IST and RST: importance-aware (and random) sparse tuning of per-layer PEFT methods
(shared/spec/ist.md), a step plugin of the trainer (pifi_jax.train.plugins) turned on by a run
config's `ist` section:

    python -m launch.train --config=configs/causal_lm.py --config.ist.mode=ist

Every step trains the PEFT parameters of `ist.n_update` sampled layers (probabilities from the
layer scores, or uniform for rst) with AdamW semantics per layer (ist.optim); every
`ist.interval` steps IST refreshes the scores by suppressing sampled layers' PEFT branches on a
batch of its own (ist.scores). The scores go to metrics.jsonl (`ist/score/<layer>`) and to a heat
map, ist_scores.png, in the run directory.
"""

from pifi_jax.ist import plugin  # registers the "ist" step plugin
from pifi_jax.ist.plugin import layer_groups, layer_index_of, make_ist_plugin

__all__ = ["layer_groups", "layer_index_of", "make_ist_plugin", "plugin"]
