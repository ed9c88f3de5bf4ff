"""MTP training (DeepSeek-V3 sec. 2.2 objective, aux-loss-free MoE balancing): loss, optimiser, jitted
data-parallel steps, orbax checkpoints, the resumable loop, and `load_model` for inference.

    from glm_fast.train import train, load_model
    result = train(load_config("tiny"), "runs/tiny")        # writes config, metrics.jsonl, tb/, checkpoints/
    model, cfg, tokenizer = load_model("runs/tiny")          # latest step
"""
from glm_fast.train.checkpoint import (CheckpointError, Checkpointer, config_mismatches, load_model,
                                       load_tokenizer, resolve_checkpoint_dir)
from glm_fast.train.export import export_model, load_export
from glm_fast.train.loop import TrainResult, evaluate, global_batch, train
from glm_fast.train.loss import balance_loss, load_imbalance, mtp_loss, shifted_targets
from glm_fast.train.optim import decay_mask, lr_schedule, make_optimizer
from glm_fast.train.step import (TrainState, abstract_train_state, data_mesh, eval_step, init_train_state,
                                 model_graphdef, router_loads, step_settings, train_step, update_router_bias)
from glm_fast.train.writers import JsonlWriter, TensorBoardWriter, read_jsonl

__all__ = [
    "export_model", "load_export",
    "CheckpointError", "Checkpointer", "JsonlWriter", "TensorBoardWriter", "TrainResult", "TrainState",
    "abstract_train_state", "balance_loss", "config_mismatches", "data_mesh", "decay_mask", "eval_step",
    "evaluate", "global_batch", "init_train_state", "load_imbalance", "load_model", "load_tokenizer",
    "lr_schedule", "make_optimizer", "model_graphdef", "mtp_loss", "read_jsonl", "resolve_checkpoint_dir",
    "router_loads", "shifted_targets", "step_settings", "train", "train_step", "update_router_bias",
]
