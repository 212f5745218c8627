"""The "before" of benchmarks/decode_speed.py --compare: jaxformer/decode.py as of commit 74db11f (fairseq EOS
at the length limit, before the decoding-speed work), kept verbatim below this note so that the speed-up is
measured side by side in one run and the outputs can be compared token for token. Not used by the library.
"""


from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from _baseline_model import Transformer, TransformerConfig, init_cache

from jaxformer.data import BOS_ID, EOS_ID, PAD_ID

__all__ = ["length_penalty", "greedy_search", "beam_search", "score_sequences", "output_limits",
           "decode_buffer_len", "NEG_INF"]

NEG_INF = -1.0e9  # finite, so sums and differences never turn into NaN


def length_penalty(length, alpha):
    """((5 + length) / 6) ** alpha; works on Python numbers and arrays."""
    return ((5.0 + length) / 6.0) ** alpha


# ----------------------------------------------------------------------------- helpers

def _config(model) -> TransformerConfig:
    if isinstance(model, TransformerConfig):
        return model
    if isinstance(model, Transformer):
        return model.config
    raise TypeError(f"expected a jaxformer Transformer (or its TransformerConfig), got {type(model).__name__}")


def _variables(params: Mapping[str, Any]) -> dict:
    """Accept {"params": tree} (what checkpoints and init return) or the bare tree."""
    if "params" in params:
        return {"params": params["params"]}
    return {"params": params}


def decode_buffer_len(src_len: int, config: TransformerConfig, *, max_len: int | None = None,
                      max_extra_len: int = 50) -> int:
    """The static output length L for sources padded to `src_len`."""
    cap = config.max_len if max_len is None else min(int(max_len), config.max_len)
    length = min(int(src_len) + int(max_extra_len), cap)
    if length < 1:
        raise ValueError(f"output length limit is {length}; max_len and max_extra_len must leave room for EOS")
    return length


def output_limits(src: jax.Array, buffer_len: int, max_extra_len: int, pad_id: int = PAD_ID) -> jax.Array:
    """[B] per-row output length limits (EOS included); filler rows (all PAD) get 1."""
    n = jnp.sum(src != pad_id, axis=-1).astype(jnp.int32)
    return jnp.where(n == 0, 1, jnp.minimum(n + max_extra_len, buffer_len)).astype(jnp.int32)


def _log_probs(logits: jax.Array) -> jax.Array:
    """Log-softmax over the vocabulary with PAD and BOS excluded."""
    logits = logits.astype(jnp.float32)
    logits = logits.at[..., PAD_ID].set(NEG_INF).at[..., BOS_ID].set(NEG_INF)
    return jax.nn.log_softmax(logits, axis=-1)


def _decode_step(model: Transformer, variables, cache, encoded, src_mask, tokens):
    """One cached decoder step: tokens [N] -> (log-probs [N, V], new cache)."""
    logits, mutated = model.apply({**variables, "cache": cache}, encoded, src_mask, tokens[:, None],
                                  decode=True, method=Transformer.decode, mutable=["cache"])
    return _log_probs(logits[:, 0]), mutated["cache"]


def _is_cross_attention_leaf(path) -> bool:
    names = [getattr(k, "key", str(k)) for k in path]
    return bool(names) and names[-1] in ("cross_key", "cross_value")


def _encode(model, variables, src):
    """-> (src_mask [B,S], encoded [B,S,D])."""
    return src != model.config.pad_id, model.apply(variables, src, method=Transformer.encode)


# ----------------------------------------------------------------------------- greedy

def _force_eos(log_probs: jax.Array, at_limit: jax.Array) -> jax.Array:
    """Where `at_limit` ([N] or broadcastable to log_probs[..., 0]), only EOS can follow: every other token's
    log-prob becomes NEG_INF and EOS keeps its own (it is not renormalised, so its cost counts)."""
    only_eos = jnp.arange(log_probs.shape[-1]) == EOS_ID
    return jnp.where(at_limit[..., None] & ~only_eos, NEG_INF, log_probs)


def _greedy(model: Transformer, buffer_len: int, max_extra_len: int, variables, src, *, eos_at_limit: bool = True):
    cfg = model.config
    batch, src_len = src.shape
    limits = output_limits(src, buffer_len, max_extra_len, cfg.pad_id)
    src_mask, encoded = _encode(model, variables, src)
    cache = init_cache(cfg, batch, src_len, buffer_len)
    log_probs, cache = _decode_step(model, variables, cache, encoded, src_mask,
                                    jnp.full((batch,), BOS_ID, jnp.int32))
    if eos_at_limit:
        log_probs = _force_eos(log_probs, limits <= 1)
    first = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
    tokens = jnp.full((batch, buffer_len), PAD_ID, jnp.int32).at[:, 0].set(first)
    done = (first == EOS_ID) | (limits <= 1)

    def cond(state):
        i, _, _, done = state
        return (i < buffer_len) & ~jnp.all(done)

    def body(state):
        i, tokens, cache, done = state
        previous = jax.lax.dynamic_index_in_dim(tokens, i - 1, axis=1, keepdims=False)
        log_probs, cache = _decode_step(model, variables, cache, None, src_mask, previous)
        if eos_at_limit:
            log_probs = _force_eos(log_probs, i + 1 >= limits)
        token = jnp.where(done, PAD_ID, jnp.argmax(log_probs, axis=-1).astype(jnp.int32))
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, token, i, axis=1)
        done = done | (token == EOS_ID) | (i + 1 >= limits)
        return i + 1, tokens, cache, done

    _, tokens, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), tokens, cache, done))
    return tokens


@functools.lru_cache(maxsize=64)
def _compiled_greedy(config: TransformerConfig, buffer_len: int, max_extra_len: int, eos_at_limit: bool):
    return jax.jit(functools.partial(_greedy, Transformer(config), buffer_len, max_extra_len,
                                     eos_at_limit=eos_at_limit))


def greedy_search(model, params, src, *, max_len: int | None = None, max_extra_len: int = 50,
                  eos_at_limit: bool = True) -> jax.Array:
    """Greedy decoding of src [B,S] -> tokens int32 [B,L] (no BOS; EOS, then PAD).

    `max_len` caps the output length (EOS included) below the model's own max_len. At a row's limit EOS is
    forced (`eos_at_limit=False`: the row is cut there without EOS).
    """
    cfg = _config(model)
    src = jnp.asarray(src, jnp.int32)
    buffer_len = decode_buffer_len(src.shape[1], cfg, max_len=max_len, max_extra_len=max_extra_len)
    return _compiled_greedy(cfg, buffer_len, int(max_extra_len), bool(eos_at_limit))(_variables(params), src)


# ----------------------------------------------------------------------------- beam search

def _gather_beams(x: jax.Array, indices: jax.Array) -> jax.Array:
    """x [B, K_in, ...], indices [B, K_out] -> [B, K_out, ...]."""
    return jnp.take_along_axis(x, indices.reshape(indices.shape + (1,) * (x.ndim - 2)), axis=1)


def _reorder_cache(cache, origin: jax.Array, batch: int, beam_size: int):
    """Gather the self-attention caches [B*K, ...] by the beams each new live beam extends.

    Cross-attention keys/values are the same for every beam of a row, so a within-row reorder leaves them
    unchanged: they are neither gathered nor recomputed. Scalars (step counters) are shared too.
    """
    def gather(path, x):
        if x.ndim == 0 or _is_cross_attention_leaf(path):
            return x
        x = x.reshape((batch, beam_size) + x.shape[1:])
        return _gather_beams(x, origin).reshape((batch * beam_size,) + x.shape[2:])
    return jax.tree_util.tree_map_with_path(gather, cache)


def _beam(model: Transformer, beam_size: int, buffer_len: int, max_extra_len: int, variables, src, alpha, *,
          eos_at_limit: bool = True):
    cfg = model.config
    batch, src_len = src.shape
    k, length_cap = beam_size, buffer_len
    limits = output_limits(src, buffer_len, max_extra_len, cfg.pad_id)  # [B]
    alpha = jnp.asarray(alpha, jnp.float32)

    # The first step runs on B rows: every beam starts from the same BOS, so the cross-attention keys/values
    # (and the BOS self-attention entry) are computed once per sentence and then repeated for the K beams.
    src_mask, encoded = _encode(model, variables, src)
    cache = init_cache(cfg, batch, src_len, buffer_len)
    first_log_probs, cache = _decode_step(model, variables, cache, encoded, src_mask,
                                          jnp.full((batch,), BOS_ID, jnp.int32))
    cache = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0) if x.ndim else x, cache)
    src_mask = jnp.repeat(src_mask, k, axis=0)  # [B*K,S]
    vocab = first_log_probs.shape[-1]

    def select(i, log_probs, live_seqs, live_scores, fin_seqs, fin_scores, done):
        """Extend the live beams by the token at position i (new length i + 1). log_probs [B,K,V]."""
        length = (i + 1).astype(jnp.float32)
        at_limit = (i + 1 >= limits)[:, None]  # [B,1]
        if eos_at_limit:  # the last position can only be EOS, at the cost of its log-prob (fairseq)
            log_probs = _force_eos(log_probs, at_limit)
        candidates = (live_scores[:, :, None] + log_probs).reshape(batch, k * vocab)
        top_scores, top_index = jax.lax.top_k(candidates, 2 * k)  # [B,2K]
        origin, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
        seqs = _gather_beams(live_seqs, origin)  # [B,2K,L]
        seqs = jax.lax.dynamic_update_index_in_dim(seqs, token, i, axis=2)
        valid = top_scores > NEG_INF / 2  # not an extension of a dead beam or a masked token
        is_eos = token == EOS_ID
        # A hypothesis is finished by EOS among the top K candidates (so K=1 follows the greedy path), or by
        # reaching the row's length limit (then the best candidate is finished: with eos_at_limit every
        # candidate there ends in EOS, else it is cut without one).
        in_top_k = jnp.arange(2 * k)[None, :] < k
        finishing = valid & ((is_eos & in_top_k) | at_limit)
        new_fin = jnp.where(finishing, top_scores / length_penalty(length, alpha), NEG_INF)
        best = jnp.argmax(new_fin, axis=1)  # [B]
        best_score = jnp.take_along_axis(new_fin, best[:, None], axis=1)[:, 0]
        better = (best_score > fin_scores) & ~done
        fin_scores = jnp.where(better, best_score, fin_scores)
        best_seq = jnp.take_along_axis(seqs, best[:, None, None], axis=1)[:, 0]
        fin_seqs = jnp.where(better[:, None], best_seq, fin_seqs)
        # The K best non-EOS candidates stay live (there are at least K among the top 2K); none past the limit.
        live_candidates = jnp.where(is_eos | at_limit | ~valid, NEG_INF, top_scores)
        live_scores, keep = jax.lax.top_k(live_candidates, k)  # [B,K]
        live_seqs = _gather_beams(seqs, keep)
        origin = jnp.take_along_axis(origin, keep, axis=1)
        # Early termination: a live beam's score can only fall as it grows, and its final score is at most
        # its log-prob over the most favourable length penalty left (at the limit for alpha >= 0).
        remaining = [length_penalty(length + 1.0, alpha), length_penalty(limits.astype(jnp.float32), alpha)]
        bound = jnp.maximum(live_scores[:, 0] / remaining[0], live_scores[:, 0] / remaining[1])
        done = done | (i + 1 >= limits) | (fin_scores >= bound) | (live_scores[:, 0] <= NEG_INF / 2)
        return live_seqs, live_scores, fin_seqs, fin_scores, done, origin

    live_seqs = jnp.full((batch, k, buffer_len), PAD_ID, jnp.int32)
    live_scores = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (batch, 1))  # one live beam
    fin_seqs = jnp.full((batch, buffer_len), PAD_ID, jnp.int32)
    fin_scores = jnp.full((batch,), NEG_INF, jnp.float32)
    done = jnp.zeros((batch,), bool)
    log_probs = jnp.broadcast_to(first_log_probs[:, None, :], (batch, k, vocab))
    live_seqs, live_scores, fin_seqs, fin_scores, done, origin = select(
        jnp.int32(0), log_probs, live_seqs, live_scores, fin_seqs, fin_scores, done)
    cache = _reorder_cache(cache, origin, batch, k)

    def cond(state):
        i, *_, done, _ = state
        return (i < length_cap) & ~jnp.all(done)

    def body(state):
        i, live_seqs, live_scores, fin_seqs, fin_scores, done, cache = state
        previous = jax.lax.dynamic_index_in_dim(live_seqs, i - 1, axis=2, keepdims=False)  # [B,K]
        log_probs, cache = _decode_step(model, variables, cache, None, src_mask, previous.reshape(batch * k))
        live_seqs, live_scores, fin_seqs, fin_scores, done, origin = select(
            i, log_probs.reshape(batch, k, vocab), live_seqs, live_scores, fin_seqs, fin_scores, done)
        cache = _reorder_cache(cache, origin, batch, k)
        return i + 1, live_seqs, live_scores, fin_seqs, fin_scores, done, cache

    state = (jnp.int32(1), live_seqs, live_scores, fin_seqs, fin_scores, done, cache)
    _, _, _, fin_seqs, fin_scores, _, _ = jax.lax.while_loop(cond, body, state)
    return fin_seqs, fin_scores


@functools.lru_cache(maxsize=64)
def _compiled_beam(config: TransformerConfig, beam_size: int, buffer_len: int, max_extra_len: int,
                   eos_at_limit: bool):
    return jax.jit(functools.partial(_beam, Transformer(config), beam_size, buffer_len, max_extra_len,
                                     eos_at_limit=eos_at_limit))


def beam_search(model, params, src, *, beam_size: int = 4, alpha: float = 0.6, max_extra_len: int = 50,
                max_len: int | None = None, eos_at_limit: bool = True) -> tuple[jax.Array, jax.Array]:
    """Beam search of src [B,S] -> (tokens int32 [B,L], scores float32 [B]): each row's best hypothesis.

    The score is the length-penalised log-prob (see module doc). With beam_size=1 and alpha=0 this is
    exactly greedy search; with alpha > 0 a single beam keeps searching after greedy's EOS and returns a
    longer hypothesis only if it scores higher. The loop stops once no live beam of any row can still
    beat that row's best finished hypothesis. At a row's length limit EOS is forced and its log-prob
    counted (fairseq); `eos_at_limit=False` is the old rule (cut there, scored without EOS).
    """
    cfg = _config(model)
    if int(beam_size) < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    src = jnp.asarray(src, jnp.int32)
    buffer_len = decode_buffer_len(src.shape[1], cfg, max_len=max_len, max_extra_len=max_extra_len)
    fn = _compiled_beam(cfg, int(beam_size), buffer_len, int(max_extra_len), bool(eos_at_limit))
    return fn(_variables(params), src, jnp.float32(alpha))


# ----------------------------------------------------------------------------- scoring

@functools.lru_cache(maxsize=16)
def _compiled_scorer(config: TransformerConfig):
    model = Transformer(config)

    def score(variables, src, tokens, alpha):
        tgt_in = jnp.concatenate([jnp.full_like(tokens[:, :1], BOS_ID), tokens[:, :-1]], axis=1)
        log_probs = _log_probs(model.apply(variables, src, tgt_in))  # [B,T,V]
        token_log_probs = jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]
        real = tokens != PAD_ID
        total = jnp.sum(jnp.where(real, token_log_probs, 0.0), axis=-1)
        return total / length_penalty(jnp.sum(real, axis=-1).astype(jnp.float32), alpha)

    return jax.jit(score)


def score_sequences(model, params, src, tokens, alpha: float = 0.6) -> jax.Array:
    """[B] length-penalised log-prob of `tokens` [B,T] (as the searches return them) given `src`,
    computed with the full (uncached) decoder and the searches' scoring."""
    tokens = np.asarray(tokens, np.int32)
    return _compiled_scorer(_config(model))(_variables(params), jnp.asarray(src, jnp.int32),
                                            jnp.asarray(tokens), jnp.float32(alpha))
