"""PiFi: a frozen LLM decoder layer plugged into a small encoder, and choosing which layer.

    module, params = pifi_jax.pifi.build("asset:minilm", "asset:smollm2", -1, num_labels=2)
    scores = pifi_jax.pifi.select_layer("asset:smollm2", texts, labels)   # scores.chosen

plugin.py: the models (encoder or decoder SLM -> W_in -> frozen layer -> W_out -> head, span
head or LM head) and `build`;
select.py: automatic layer selection; run.py: the trainer's hook (config section `pifi`);
names.py: short names of the paper's encoders and LLMs.
"""

from pifi_jax.pifi import run  # noqa: F401 (registers the "pifi" model builder)
from pifi_jax.pifi.names import LLMS, SLMS, resolve_llm, resolve_slm
from pifi_jax.pifi.plugin import (
    FROZEN_RULES,
    PifiCache,
    PifiCausalLM,
    PifiClassifier,
    PifiHead,
    PifiPlugin,
    PifiSeq2Seq,
    PifiSpanModel,
    build,
    layer_fingerprint,
)
from pifi_jax.pifi.select import LayerScores, SelectionConfig, score_layers, select_layer

__all__ = [
    "FROZEN_RULES",
    "LLMS",
    "SLMS",
    "LayerScores",
    "PifiCache",
    "PifiCausalLM",
    "PifiClassifier",
    "PifiHead",
    "PifiPlugin",
    "PifiSeq2Seq",
    "PifiSpanModel",
    "SelectionConfig",
    "build",
    "layer_fingerprint",
    "resolve_llm",
    "resolve_slm",
    "score_layers",
    "select_layer",
]
