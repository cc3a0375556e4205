"""Training: objectives, model builders, path-rule freezing, optimizers, the pure step, the loop,
checkpoints and metrics."""

# Submodules of the public API too: pifi_jax.train.predict, .glue_suite, .sweep.
from pifi_jax.train import glue_suite, predict, sweep
from pifi_jax.train.builders import BuiltModel, get_builder, register_builder
from pifi_jax.train.checkpoint import Checkpointer
from pifi_jax.train.loop import default_workdir, evaluate_run, setup_run, train_and_evaluate
from pifi_jax.train.metrics import compute_metrics
from pifi_jax.train.objectives import (
    OBJECTIVES,
    CausalLM,
    Classification,
    MultiLabel,
    Regression,
    Seq2Seq,
    make_objective,
)
from pifi_jax.train.optim import make_optimizer, make_schedule
from pifi_jax.train.partition import merge_params, partition_table, split_params
from pifi_jax.train.step import TrainState, make_eval_step, make_train_step

__all__ = [
    "OBJECTIVES",
    "BuiltModel",
    "CausalLM",
    "Classification",
    "MultiLabel",
    "Regression",
    "Seq2Seq",
    "get_builder",
    "make_objective",
    "register_builder",
    "Checkpointer",
    "TrainState",
    "compute_metrics",
    "default_workdir",
    "evaluate_run",
    "make_eval_step",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "merge_params",
    "partition_table",
    "setup_run",
    "split_params",
    "train_and_evaluate",
    "glue_suite",
    "predict",
    "sweep",
]
