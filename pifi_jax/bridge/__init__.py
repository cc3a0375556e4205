"""Gradient-free transfer of PEFT modules from a small model to a large one through a pruned bridge
(Jin, Zhang, Zong, EMNLP 2023; shared/spec/bridge.md).

mapping.py: which SLM layer serves each LLM layer, and the shared-tokenizer check;
arch.py: which axis of each tensor of a family (Llama, GPT-2) is the stream, a head or a unit;
fisher.py: the LLM's empirical Fisher importance on task data, one layer at a time;
fisher_seq2seq.py, seq2seq_bridge.py: the same and the bridge for an encoder-decoder (T5) LLM;
prune.py: the kept dimensions, heads and units, and the bridge checkpoint built from them;
plug.py: W_plug fitted between the two models' activations, LoRA / adapter / prefix modules
carried into the LLM; seq2seq_plug.py: the same for a T5 pair's LoRA (one site per attention
kind, each stack depth-mapped alone);
adapt.py: the modules, W_plug and W_down trained through the bridge (the LLM untouched);
run.py: the trainer's model builder "bridge"; procedure.py: the stages in one run directory.
"""

from pifi_jax.bridge import adapt, plug, run, seq2seq_plug  # noqa: F401 (run registers the builder)
from pifi_jax.bridge.adapt import (
    adapt_loss,
    bridge_leaves,
    export_llm_adapter,
    init_transfer,
    llm_leaves,
    plugged_llm,
)
from pifi_jax.bridge.fisher import FisherScores, fisher_scores, reduce_layer
from pifi_jax.bridge.fisher_seq2seq import Seq2SeqFisherScores, seq2seq_fisher_scores
from pifi_jax.bridge.mapping import (
    check_same_tokenizer,
    depth_map,
    served_layers,
    write_depth_map,
)
from pifi_jax.bridge.plug import fit_plug, plug_modules, slm_modules
from pifi_jax.bridge.prune import (
    BridgeSizes,
    Selection,
    bridge_config,
    bridge_sizes,
    prune,
    save_bridge,
    select,
)
from pifi_jax.bridge.seq2seq_bridge import Seq2SeqSelection, prune_seq2seq, select_seq2seq

__all__ = [
    "adapt",
    "adapt_loss",
    "bridge_leaves",
    "export_llm_adapter",
    "init_transfer",
    "llm_leaves",
    "BridgeSizes",
    "FisherScores",
    "Selection",
    "bridge_config",
    "bridge_sizes",
    "check_same_tokenizer",
    "depth_map",
    "fisher_scores",
    "fit_plug",
    "plug",
    "plug_modules",
    "plugged_llm",
    "prune",
    "reduce_layer",
    "save_bridge",
    "select",
    "served_layers",
    "slm_modules",
    "write_depth_map",
    "Seq2SeqFisherScores",
    "Seq2SeqSelection",
    "seq2seq_fisher_scores",
    "select_seq2seq",
    "prune_seq2seq",
]
