"""What a search step may pick, as masks on its scores: PAD and BOS never, only EOS at a row's length limit,
a target prefix's tokens first, and only what a grammar allows (`jaxformer.grammar`).

A token a mask rules out scores NEG_INF. PAD and BOS are masked before the softmax (`masked_logits`,
`search_log_probs`), so the other tokens' log-probs are renormalised; EOS at the limit, a prefix's token and a
grammar's choice are forced after it, so the token that stays keeps its own log-prob and its cost counts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxformer import grammar as grammar_lib
from jaxformer.data import BOS_ID, EOS_ID, PAD_ID

NEG_INF = -1.0e9  # finite, so sums and differences never turn into NaN


def masked_logits(logits: jax.Array) -> jax.Array:
    """Float32 logits with PAD and BOS set to NEG_INF: they are never generated."""
    logits = logits.astype(jnp.float32)
    never = (jnp.arange(logits.shape[-1]) == PAD_ID) | (jnp.arange(logits.shape[-1]) == BOS_ID)
    return jnp.where(never, jnp.float32(NEG_INF), logits)  # one fused pass, same values as `.at[].set`


def search_log_probs(logits: jax.Array) -> jax.Array:
    """Log-softmax over the vocabulary with PAD and BOS excluded."""
    return jax.nn.log_softmax(masked_logits(logits), axis=-1)


def force_eos(log_probs: jax.Array, at_limit: jax.Array) -> jax.Array:
    """Where `at_limit` ([N] or broadcastable to log_probs[..., 0]), only EOS can follow: every other token's
    log-prob becomes NEG_INF and EOS keeps its own (it is not renormalised, so its cost counts)."""
    only_eos = jnp.arange(log_probs.shape[-1]) == EOS_ID
    return jnp.where(at_limit[..., None] & ~only_eos, NEG_INF, log_probs)


def prefix_token(prefix: jax.Array | None, i, at_limit: jax.Array) -> tuple[jax.Array, jax.Array] | None:
    """(the token forced at position i [B], where it is forced [B]) for target prefixes [B,P] (PAD after each
    row's prefix), or None without prefixes. At a row's length limit EOS wins: the prefix is cut to fit."""
    if prefix is None:
        return None
    wanted = jax.lax.dynamic_index_in_dim(prefix, jnp.minimum(i, prefix.shape[1] - 1), axis=1, keepdims=False)
    return wanted, (i < prefix.shape[1]) & (wanted != PAD_ID) & ~at_limit


def constrain(scores: jax.Array, grammar, state, room) -> jax.Array:
    """Scores [..., V] with the tokens the grammar forbids in each hypothesis (state [...]) at NEG_INF
    (`jaxformer.grammar`; room: the tokens that may follow within the length limit). Without a grammar, the
    scores as they are."""
    if grammar is None:
        return scores
    return jnp.where(grammar_lib.allowed(state, grammar["kinds"], room), scores, NEG_INF)


def advance_grammar(grammar, state, token):
    """The grammar state [...] after each hypothesis's `token` [...]; None without a grammar."""
    return None if grammar is None else grammar_lib.advance(state, token, grammar["kinds"])


def force_prefix(log_probs: jax.Array, forced) -> jax.Array:
    """Where a prefix token is forced (`prefix_token`), only it can follow, at its own log-prob's cost.
    log_probs [B,V] or [B,K,V]."""
    if forced is None:
        return log_probs
    wanted, where = (a.reshape(a.shape + (1,) * (log_probs.ndim - 1)) for a in forced)
    return jnp.where(where & (jnp.arange(log_probs.shape[-1]) != wanted), NEG_INF, log_probs)


def as_grammar(grammar):
    """A grammar as {"kinds": int32 [V], "words": int32 [B]} (`jaxformer.grammar`), or None."""
    if grammar is None:
        return None
    return {"kinds": jnp.asarray(grammar["kinds"], jnp.int32), "words": jnp.asarray(grammar["words"], jnp.int32)}


def as_prefix(prefix):
    """Target prefixes as int32 [B,P] (P >= 1), or None."""
    if prefix is None:
        return None
    prefix = jnp.asarray(prefix, jnp.int32)
    if prefix.ndim != 2 or prefix.shape[1] < 1:
        raise ValueError(f"prefix must be [batch, length >= 1] tokens, got shape {prefix.shape}")
    return prefix
