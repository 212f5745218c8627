"""The compiled, data-parallel train and eval steps: pure functions of (state, batch) over a device mesh.

One update ("step", what `train.steps` counts) consumes `train.grad_accum_steps` batches; the gradient is
that of the label-smoothed loss summed over every non-pad target token of all of them, divided by their
number, so accumulating k batches is the same update as one batch k times larger (fairseq's --update-freq).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from jaxformer import parallel
from jaxformer.data import PAD_ID
from jaxformer.loss import token_statistics
from jaxformer.model import Transformer
from jaxformer.optim import make_optimizer



@flax.struct.dataclass
class TrainState:
    """Everything an update changes; a pytree, so it goes through `jit` and orbax whole."""

    step: jax.Array     # int32 scalar: updates applied so far
    params: Any         # {"params": ...}: float32 master weights, whatever the compute dtype
    opt_state: Any
    rng: jax.Array      # uint32 PRNG key data; update s draws its dropout from fold_in(rng, s)


OPTIONAL_FIELDS = ("src_segments", "tgt_segments", "src_positions", "tgt_positions")  # packed batches' extra inputs


def _loss_sums(params, batch, rng, *, model: Transformer, smoothing: float, deterministic: bool):
    """(Σ smoothed loss, sums) over the batch's non-pad target tokens."""
    logits = model.apply(params, batch["src"], batch["tgt_in"], deterministic=deterministic,
                         rngs=None if deterministic else {"dropout": rng},
                         **{k: batch[k] for k in OPTIONAL_FIELDS if k in batch})  # [B,T,V] float32
    targets = batch["tgt_out"]
    weights = (targets != PAD_ID).astype(jnp.float32)
    smoothed, nll, correct = token_statistics(logits, targets, smoothing)
    correct = correct.astype(jnp.float32)
    sums = {"loss": jnp.sum(smoothed * weights), "nll": jnp.sum(nll * weights),
            "correct": jnp.sum(correct * weights), "tokens": jnp.sum(weights)}
    return sums["loss"], sums


def compute_gradients(state: TrainState, batch, micro_step=0, *, model: Transformer, smoothing: float):
    """Gradient of the loss *summed* over the batch's tokens, and the batch's sums."""
    rng = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step), micro_step)
    grads, sums = jax.grad(_loss_sums, has_aux=True)(state.params, batch, rng, model=model,
                                                     smoothing=smoothing, deterministic=False)
    return grads, sums


def apply_gradients(state: TrainState, grads, sums, *, tx: optax.GradientTransformation, grad_sharding=None):
    """One optimizer update with the token-mean gradient; returns (new state, metrics sums + grad_norm).

    With `grad_sharding` (the optimizer state's split, per parameter) each device gets only its share of
    the gradient sum (XLA CPU computes it as a whole all-reduce and a slice: benchmarks/cpu_collectives.py),
    updates its share of the parameters, and XLA all-gathers the new ones.
    """
    if grad_sharding is not None:
        grads = jax.lax.with_sharding_constraint(grads, grad_sharding)
    grads = jax.tree.map(lambda g: g / jnp.maximum(sums["tokens"], 1.0), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    metrics = dict(sums, grad_norm=grad_norm)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def train_step(state: TrainState, batch, *, model: Transformer, tx: optax.GradientTransformation,
               smoothing: float, grad_sharding=None):
    """One update from one batch: pure (state, batch) -> (state, metrics)."""
    grads, sums = compute_gradients(state, batch, model=model, smoothing=smoothing)
    return apply_gradients(state, grads, sums, tx=tx, grad_sharding=grad_sharding)


def accumulate_gradients(state: TrainState, batch, accumulated, micro_step, *, model: Transformer,
                         smoothing: float):
    """Add one micro-batch's gradient and sums to `accumulated` ((grads, sums), summed over tokens)."""
    grads, sums = compute_gradients(state, batch, micro_step, model=model, smoothing=smoothing)
    return jax.tree.map(jnp.add, accumulated, (grads, sums))


def _apply_accumulated(state, accumulated, *, tx, grad_sharding=None):
    grads, sums = accumulated
    return apply_gradients(state, grads, sums, tx=tx, grad_sharding=grad_sharding)


def eval_step(params, batch, totals, *, model: Transformer, smoothing: float):
    """`totals` plus the batch's sums of smoothed loss, nll, correct predictions and tokens (no dropout).

    Threading the totals through makes each evaluation depend on the previous one. Independent programs
    with all-reduces can otherwise run concurrently on a multi-device CPU and deadlock in the collective.
    """
    sums = _loss_sums(params, batch, None, model=model, smoothing=smoothing, deterministic=True)[1]
    return jax.tree.map(jnp.add, totals, sums)


def _zero_sums():
    zero = jnp.zeros((), jnp.float32)
    return {"loss": zero, "nll": zero, "correct": zero, "tokens": zero}


def _zero_accumulator(params):
    return jax.tree.map(jnp.zeros_like, params), _zero_sums()


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


class Steps:
    """The jit-compiled steps for one model, optimizer and mesh (each compiles once per batch shape).

    Metrics and parameters live replicated on the mesh; batches arrive split over its "data" axis, so each
    step is one program over the whole global batch. The optimizer state (and an accumulated gradient) is
    replicated too, or with `shard_optimizer_state` split over the "data" axis (ZeRO-1): each device then
    keeps and updates 1/N of Adam's moments instead of running the whole update N times.
    """

    def __init__(self, model: Transformer, tx: optax.GradientTransformation, mesh, *, label_smoothing: float,
                 shard_optimizer_state: bool = False):
        self.model, self.tx, self.mesh = model, tx, mesh
        self.in_flight = parallel.programs_in_flight(mesh)  # programs a loop may queue before it waits
        out = parallel.replicated(mesh)
        self._shapes = shapes = jax.eval_shape(self._init, 0)
        split = (lambda s: parallel.split_over_data(mesh, s.shape)) if shard_optimizer_state else (lambda s: out)
        self.state_sharding = TrainState(step=out, params=jax.tree.map(lambda s: out, shapes.params),
                                         opt_state=jax.tree.map(split, shapes.opt_state), rng=out)
        grad_sharding = jax.tree.map(split, shapes.params) if shard_optimizer_state else None
        kw = dict(model=model, smoothing=float(label_smoothing))
        state_out = (self.state_sharding, out)
        self.train = jax.jit(functools.partial(train_step, tx=tx, grad_sharding=grad_sharding, **kw),
                             donate_argnums=0, out_shardings=state_out)
        accumulator = (out if grad_sharding is None else grad_sharding, out)
        self.accumulate = jax.jit(functools.partial(accumulate_gradients, **kw), donate_argnums=2,
                                  out_shardings=accumulator)
        self.apply = jax.jit(functools.partial(_apply_accumulated, tx=tx, grad_sharding=grad_sharding),
                             donate_argnums=0, out_shardings=state_out)
        self.zeros = jax.jit(_zero_accumulator, out_shardings=accumulator)
        self._eval = jax.jit(functools.partial(eval_step, **kw), donate_argnums=2, out_shardings=out)
        self._zero_sums = jax.jit(_zero_sums, out_shardings=out)
        self.all_finite = jax.jit(_all_finite)

    @classmethod
    def from_config(cls, model: Transformer, train_cfg, mesh, *, shard_optimizer_state: bool | None = None):
        """The steps train.py runs: `train_cfg`'s optimizer, label smoothing and optimizer-state placement
        (`shard_optimizer_state`, when given, overrides the config's)."""
        shard = train_cfg.shard_optimizer_state if shard_optimizer_state is None else shard_optimizer_state
        return cls(model, make_optimizer(train_cfg, model.config.d_model), mesh,
                   label_smoothing=float(train_cfg.label_smoothing), shard_optimizer_state=bool(shard))

    def _init(self, seed: int) -> TrainState:
        init_key, dropout_key = jax.random.split(jax.random.key(seed))
        tokens = jnp.ones((1, 8), jnp.int32)
        params = self.model.init(init_key, tokens, tokens)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                          rng=jax.random.key_data(dropout_key))

    def init_state(self, seed: int) -> TrainState:
        """Fresh parameters and optimizer state from `seed`, placed on the mesh as the steps keep them."""
        return jax.jit(self._init, static_argnums=0, out_shardings=self.state_sharding)(seed)

    def abstract_state(self) -> TrainState:
        """The state's shapes, dtypes and placement, without computing (or allocating) it: a restore target."""
        return jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                            self._shapes, self.state_sharding)

    def evaluate(self, params, batches) -> dict:
        """Host sums (loss, nll, correct, tokens) over global batches, without dropout."""
        totals = self._zero_sums()
        for i, batch in enumerate(batches, 1):
            totals = self._eval(params, batch, totals)
            self._pace(i + 1, totals)  # after `_zero_sums` and i evaluations
        return jax.device_get(totals)

    def update(self, state: TrainState, batches: list) -> tuple[TrainState, dict]:
        """One optimizer update from one or more (accumulated) global batches."""
        if len(batches) == 1:
            return self.train(state, batches[0])
        accumulated = self.zeros(state.params)
        for i, batch in enumerate(batches):
            accumulated = self.accumulate(state, batch, accumulated, i)
            self._pace(i + 2, accumulated[1])  # after `zeros` and i + 1 micro-steps
        return self.apply(state, accumulated)

    def updates_ahead(self, grad_accum_steps: int, most: int) -> int:
        """How many `update`s of `grad_accum_steps` batches a loop may dispatch beyond the last finished one:
        `most`, fewer where the device's queue is bounded (an update is 1 program, or grad_accum_steps + 2)."""
        if not self.in_flight:
            return most
        per_update = 1 if grad_accum_steps == 1 else grad_accum_steps + 2
        return max(0, min(most, self.in_flight // per_update - 1))

    def _pace(self, dispatched: int, output) -> None:
        """Wait for `output` after every `in_flight` programs a loop dispatched (parallel.programs_in_flight)."""
        if self.in_flight and dispatched % self.in_flight == 0:
            jax.block_until_ready(output)




def summarize(sums: dict) -> dict:
    tokens = max(float(sums["tokens"]), 1.0)
    nll = float(sums["nll"]) / tokens
    return {"loss": float(sums["loss"]) / tokens, "nll": nll, "ppl": math.exp(nll) if nll < 700 else float("inf"),
            "accuracy": float(sums["correct"]) / tokens, "tokens": int(sums["tokens"])}


def evaluate_loss(steps: Steps, params, batches: list) -> dict:
    """Smoothed loss, nll, perplexity and token accuracy over a list of host batches."""
    sums = steps.evaluate(params, parallel.global_batches(batches, steps.mesh))
    if not sums["tokens"]:
        raise ValueError("the validation split gave no target tokens")
    return summarize(sums)
