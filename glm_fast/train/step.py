"""Train state, data-parallel layout, and the jitted train and eval steps.

The model is split once (`nnx.split`) into a static graph definition and plain-dict pytrees of float32 master
parameters (`nnx.Param`) and router correction biases (`RouterBias`). A step casts a copy of the parameters to
`train.compute_dtype` for the forward, differentiates with respect to the float32 masters, applies the optax
update, and then moves each router's bias by DeepSeek-V3's auxiliary-loss-free rule (sec. 2.1.2):
bias_e += gamma * sign(mean_load - load_e), from that batch's expert loads.

Data parallelism: a 1-D mesh over the local devices (axis "data"); the batch is sharded on its first axis and
the state is replicated; XLA (GSPMD) inserts the gradient all-reduce. It runs unchanged on one device.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from glm_fast.config import Config, ModelConfig, TrainConfig
from glm_fast.model import DTYPES, Model
from glm_fast.model.moe import RouterBias
from glm_fast.train.loss import balance_loss, load_imbalance, mtp_loss
from glm_fast.train.optim import lr_schedule, make_optimizer

DATA_AXIS = "data"


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes. `params`/`router_bias` are `nnx.to_pure_dict` trees."""

    params: Any       # float32 master weights
    router_bias: Any  # float32 [E] per MoE router
    opt_state: Any
    step: jax.Array   # int32 []: updates applied so far
    rng: jax.Array    # uint32 [2]: advanced every step (for stochastic features; restored on resume)


def master_config(mcfg: ModelConfig) -> ModelConfig:
    """The model config training builds: float32 master weights whatever `model.dtype` says (that is the
    inference dtype `load_model` casts to)."""
    return dataclasses.replace(mcfg, dtype="float32")


def split_model(model: Model):
    """model -> (graphdef, params, router_bias) as plain dicts; fails if the model holds other state."""
    graphdef, params, bias, rest = nnx.split(model, nnx.Param, RouterBias, ...)
    leftover = [".".join(map(str, path)) for path, _ in nnx.to_flat_state(rest)]
    if leftover:
        raise ValueError(f"model variables that are neither nnx.Param nor RouterBias: {leftover[:5]}; "
                         "glm_fast.train does not know how to train or checkpoint them")
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(bias)


def model_graphdef(mcfg: ModelConfig):
    """The static graph definition of the training model, without allocating parameters."""
    return split_model(nnx.eval_shape(lambda: Model(master_config(mcfg), rngs=nnx.Rngs(0))))[0]


def _init_arrays(cfg: Config) -> TrainState:
    _, params, bias = split_model(Model(master_config(cfg.model), rngs=nnx.Rngs(cfg.train.seed)))
    return TrainState(params=params, router_bias=bias, opt_state=make_optimizer(cfg.train).init(params),
                      step=jnp.zeros((), jnp.int32),
                      rng=jax.random.fold_in(jax.random.PRNGKey(cfg.train.seed), 1))


def init_train_state(cfg: Config, mesh: Mesh | None = None) -> tuple[Any, TrainState]:
    """Fresh (graphdef, state) from `train.seed`, replicated over `mesh` when given."""
    state = _init_arrays(cfg)
    if mesh is not None:
        state = replicate(state, mesh)
    return model_graphdef(cfg.model), state


def abstract_train_state(cfg: Config, mesh: Mesh | None = None) -> TrainState:
    """The state's shapes/dtypes (and replicated shardings over `mesh`), for restoring a checkpoint."""
    shapes = jax.eval_shape(lambda: _init_arrays(cfg))
    if mesh is None:
        return shapes
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


# ---- data parallel layout ------------------------------------------------------------------------------
def data_mesh(devices=None) -> Mesh:
    """1-D mesh over `devices` (default: `jax.devices()`, every process's) with axis "data"."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicate(tree, mesh: Mesh):
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(tokens, mesh: Mesh):
    """tokens [B, S+1] (host array) -> a global array split over the mesh's "data" axis on B."""
    n = mesh.shape[DATA_AXIS]
    if tokens.shape[0] % n:
        raise ValueError(f"train.batch_size={tokens.shape[0]} is not divisible by the {n} devices of the data "
                         f"mesh: use a multiple of {n}")
    return jax.device_put(np.asarray(tokens, np.int32), NamedSharding(mesh, P(DATA_AXIS)))


# ---- router bias (auxiliary-loss-free balancing) ---------------------------------------------------------
def router_loads(aux: dict, mcfg: ModelConfig) -> dict:
    """Expert loads [E] arranged like the `router_bias` tree, one per router.

    With `mtp_share_weights` one MTP module runs at every depth: its router gets the mean load over depths.
    """
    leaf = lambda load: {"mlp": {"gate": {"e_score_correction_bias": load}}}  # noqa: E731
    out: dict = {}
    for i, layer_aux in enumerate(aux["layers"]):
        if "moe" in layer_aux:
            out.setdefault("layers", {})[i] = leaf(layer_aux["moe"]["expert_load"])
    per_module: dict[int, list] = {}
    for k, depth_aux in enumerate(aux["mtp"]):
        if "moe" in depth_aux:
            per_module.setdefault(0 if mcfg.mtp_share_weights else k, []).append(depth_aux["moe"]["expert_load"])
    for m, loads in per_module.items():
        out.setdefault("mtp", {})[m] = {"block": leaf(jnp.mean(jnp.stack(loads), axis=0))}
    return out


def update_router_bias(bias: dict, loads: dict, rate: float) -> dict:
    """bias_e += rate * sign(mean(load) - load_e) for every router (DeepSeek-V3 sec. 2.1.2)."""
    try:
        return jax.tree.map(lambda b, l: b + rate * jnp.sign(jnp.mean(l) - l).astype(b.dtype), bias, loads)
    except ValueError as e:
        raise ValueError(f"router biases and expert loads do not line up ({e}); the model's MoE layout changed "
                         "without glm_fast.train.step.router_loads following") from None


# ---- steps ---------------------------------------------------------------------------------------------
# The TrainConfig fields a step reads; `step_settings` resets the others so that runs differing only in
# logging/eval/checkpoint cadence share one compiled step (the config is a static jit argument).
STEP_FIELDS = ("steps", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "grad_clip", "b1", "b2",
               "mtp_lambda", "compute_dtype", "router_bias_update_rate", "seq_aux_loss_weight")


def step_settings(tcfg: TrainConfig) -> TrainConfig:
    """`tcfg` with every field a step does not read at its default (the jit cache key)."""
    return TrainConfig(**{name: getattr(tcfg, name) for name in STEP_FIELDS})


def cast_floating(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _forward(graphdef, params, bias, tokens, tcfg: TrainConfig):
    """Compute-dtype forward and loss. tokens [B, S+1] -> (loss incl. balance term, (metrics, router loads))."""
    model = nnx.merge(graphdef, cast_floating(params, DTYPES[tcfg.compute_dtype]), bias)
    logits, mtp_logits, aux = model(tokens[:, :-1], return_aux=True)
    loss, metrics = mtp_loss(logits, mtp_logits, tokens, tcfg.mtp_lambda)
    metrics["seq_aux_loss"] = balance_loss(aux)
    metrics.update(load_imbalance(aux))
    if tcfg.seq_aux_loss_weight:
        loss = loss + tcfg.seq_aux_loss_weight * metrics["seq_aux_loss"]
    metrics["loss"] = loss
    return loss, (metrics, router_loads(aux, model.cfg))


@functools.partial(jax.jit, static_argnames=("graphdef", "tcfg"))
def train_step(state: TrainState, tokens, *, graphdef, tcfg: TrainConfig) -> tuple[TrainState, dict]:
    """One AdamW update plus the router-bias update. tokens [B, S+1] int32 -> (new state, metrics).

    Metrics (float32): loss, main_loss, main_acc, mtp_loss [D], mtp_acc [D], seq_aux_loss, lr, grad_norm
    (before clipping), load_imbalance (mean over routers of max/mean expert load), load_imbalance_max.
    """
    grad_fn = jax.value_and_grad(_forward, argnums=1, has_aux=True)
    (_, (metrics, loads)), grads = grad_fn(graphdef, state.params, state.router_bias, tokens, tcfg)
    updates, opt_state = make_optimizer(tcfg).update(grads, state.opt_state, state.params)
    params = jax.tree.map(lambda p, u: p + u, state.params, updates)
    bias = state.router_bias
    if tcfg.router_bias_update_rate:
        bias = update_router_bias(bias, jax.lax.stop_gradient(loads), tcfg.router_bias_update_rate)
    metrics["lr"] = lr_schedule(tcfg)(state.step)
    metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    rng, _ = jax.random.split(state.rng)
    new_state = TrainState(params=params, router_bias=bias, opt_state=opt_state, step=state.step + 1, rng=rng)
    return new_state, metrics


@functools.partial(jax.jit, static_argnames=("graphdef", "tcfg"))
def eval_step(state: TrainState, tokens, *, graphdef, tcfg: TrainConfig) -> dict:
    """Loss and accuracies on one batch (no update): the train step's metrics minus lr/grad_norm."""
    _, (metrics, _) = _forward(graphdef, state.params, state.router_bias, tokens, tcfg)
    return metrics
