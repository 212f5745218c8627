"""The paper's optimizer (Section 5.3): Adam(0.9, 0.98, 1e-9) on the warmup / inverse-square-root rate."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax



def learning_rate_schedule(d_model: int, warmup_steps: int, scale: float = 1.0) -> optax.Schedule:
    """Eq. 3: lrate = scale · d_model^-0.5 · min(step^-0.5, step · warmup_steps^-1.5).

    optax calls a schedule with the number of updates already applied (0 for the first update); the
    paper's `step` numbers updates from 1, so the schedule evaluates the formula at count + 1. The first
    update therefore uses step 1's small positive rate (at step 0 the formula is 0 and the first update
    would be wasted), and the peak, d_model^-0.5 · warmup^-0.5 (7.0e-4 for d_model 512, warmup 4000), is
    the rate of update number `warmup_steps`, i.e. count = warmup_steps - 1.
    """
    peak_factor = float(scale) * float(d_model) ** -0.5
    warmup_factor = float(warmup_steps) ** -1.5

    def schedule(count):
        step = jnp.asarray(count, jnp.float32) + 1.0
        return peak_factor * jnp.minimum(jax.lax.rsqrt(step), step * warmup_factor)

    return schedule


def make_optimizer(train_cfg: ml_collections.ConfigDict, d_model: int) -> optax.GradientTransformation:
    """Adam(β1, β2, ε) on the schedule above (AdamW when train.weight_decay > 0), after optional
    clipping of the gradient's global norm to train.grad_clip_norm."""
    schedule = learning_rate_schedule(d_model, train_cfg.warmup_steps, train_cfg.lr_scale)
    if train_cfg.weight_decay > 0:
        adam = optax.adamw(schedule, b1=train_cfg.adam_b1, b2=train_cfg.adam_b2, eps=train_cfg.adam_eps,
                           weight_decay=train_cfg.weight_decay)
    else:
        adam = optax.adam(schedule, b1=train_cfg.adam_b1, b2=train_cfg.adam_b2, eps=train_cfg.adam_eps)
    if train_cfg.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip_norm), adam)
    return adam
