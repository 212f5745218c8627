"""Greedy and beam search over the cached decoder, batched and `jit`-compiled.

Both searches encode the source once, run the first decoder step on the encoder
output (which computes and caches every layer's cross-attention keys/values,
once per sentence), and then feed one token per step with `encoded=None`, so
later steps read those keys/values from the cache. The loop is a
`jax.lax.while_loop` that stops as soon as every row is done, in segments
(`decode_cache.search_segments`): steps before position 16 attend over a 16-position
self-attention cache, then 32, ..., then the whole buffer, and a search that is
done never makes the larger caches; once few rows are live, they finish in a batch
a quarter the size (`decode_rows`). Each search also returns its step count, each
row's `done_at` step (the row-steps it needed) and the row-steps it computed. With
`staged=True` a search is two programs, and the second (the later segments) is
compiled and run only for a batch that reaches them (`decode_rows.Dispatched`).

Conventions shared by everything here:
  * `src` is [B, S] int32: tokens + EOS, right-padded with PAD. An all-PAD row is
    a filler row (used to pad batches to a fixed shape) and finishes at once.
  * Outputs are [B, L] int32 without BOS: the hypothesis, its EOS, then PAD.
  * Length limit per row, counting the output's EOS: the row's source length
    counting its EOS (its non-PAD tokens) + `max_extra_len`, capped by `max_len`
    and by the model's `max_len`; so "input length + 50" in the paper's sense
    (words + 50), with both ends counting their EOS. At the limit EOS is forced,
    as in fairseq: the last position can only be EOS, and its log-probability
    counts in the score, so an unfinished (say, looping) hypothesis pays for the
    EOS it never chose and does not compete for free with finished ones.
    L = min(S + max_extra_len, max_len, model max_len) is the static buffer length.
  * PAD and BOS are never generated: their logits are masked before the
    softmax, so log-probabilities are renormalised over the other tokens (and
    `score_sequences` scores the same way).
  * Score of a hypothesis = sum of its token log-probs (EOS included) /
    length_penalty(len, alpha), len counting the EOS (Wu et al., 2016).

Beam search, per row: the 2K best one-token extensions of the K live beams are
ranked; an extension ending in EOS among the top K finishes a hypothesis (as in
fairseq, so a single beam follows greedy's path), and the K best other ones stay
live; the best finished hypothesis so far is kept. A row is done when no live
beam can beat it: a live beam's log-prob only falls, so its final score is at most
its log-prob over the most favourable length penalty left (at the length limit
when alpha >= 0), the bound of the Flax WMT / tensor2tensor beam search. Finished
hypotheses are padded with PAD after their EOS. That is `stop="bound"`, the
default. `stop="finished"` is fairseq's and CTranslate2's rule instead: a row is
done once K hypotheses have finished, and scores are sum / len**alpha.

The caches, and how the beams of a sentence share them, are `jaxformer.decode_cache`'s.
Which tokens a step may pick (PAD and BOS never, EOS at the limit, prefixes, a grammar) is
`jaxformer.decode_masks`'s.

Compiled functions are cached per (model config, search settings); `jit` then
caches per input shape, so callers should pad batches to a few bucket shapes
(as `jaxformer.translate` does).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer import grammar as grammar_lib
from jaxformer.config import STOP_RULES
from jaxformer.decode_cache import beam_search_cache, reorder_beams, search_segments
from jaxformer.decode_masks import (NEG_INF, advance_grammar, as_grammar, as_prefix, constrain, force_eos, force_prefix,
                                    masked_logits, prefix_token, search_log_probs)
from jaxformer.decode_rows import Dispatched, dispatch, search_stage
from jaxformer.model import Transformer, TransformerConfig, unwrap
from jaxformer.ops import block_top_k, first_argmax

from jaxformer.data import BOS_ID, EOS_ID, PAD_ID

__all__ = ["length_penalty", "greedy_search", "sample_search", "beam_search", "beam_search_nbest", "score_sequences",
           "token_log_probs", "output_limits",
           "decode_buffer_len", "init_cache", "NEG_INF", "Dispatched"]


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
    return {"params": unwrap(params)}


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


def init_cache(config: TransformerConfig, batch_size: int, src_len: int, max_decode_len: int):
    """An empty decode cache for `batch_size` rows, `src_len` source positions, `max_decode_len` steps."""
    if max_decode_len > config.max_len:
        raise ValueError(f"max_decode_len={max_decode_len} exceeds the model's max_len={config.max_len}")
    encoded = jnp.zeros((batch_size, src_len, config.d_model), config.compute_dtype)
    src_mask = jnp.ones((batch_size, src_len), bool)
    tgt = jnp.zeros((batch_size, max_decode_len), jnp.int32)
    variables = jax.eval_shape(lambda: Transformer(config).init(
        jax.random.key(0), encoded, src_mask, tgt, decode=True, method=Transformer.decode))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables["cache"])


def _decode_step(model: Transformer, variables, cache, encoded, src_mask, tokens, normalize: bool = True):
    """One cached decoder step: tokens [N] -> (log-probs [N, V], new cache). In beam search N = B * K while
    src_mask stays [B, S]. normalize=False returns the masked logits instead (same argmax, no softmax: all
    greedy search needs)."""
    logits, mutated = model.apply({**variables, "cache": cache}, encoded, src_mask, tokens[:, None],
                                  decode=True, method=Transformer.decode, mutable=["cache"])
    scores = search_log_probs(logits[:, 0]) if normalize else masked_logits(logits[:, 0])
    return scores, mutated["cache"]


def _encode(model, variables, src):
    """-> (src_mask [B,S], encoded [B,S,D])."""
    return src != model.config.pad_id, model.apply(variables, src, method=Transformer.encode)


# ----------------------------------------------------------------------------- greedy

SAMPLING = ("full", "topk", "topp")  # how `sample_search` draws each token


def _sample(logits: jax.Array, keys: jax.Array, i, sampling: dict, kind: str, top_k: int) -> jax.Array:
    """One token per row drawn from softmax(logits / temperature), cut to the top_k tokens ("topk": exactly k,
    ties to the lowest index as `jax.lax.top_k`) or to the smallest set holding top_p of the probability
    ("topp"). keys [B] (one per row), folded with the step i, so a row's draws depend on its key and its own
    logits only."""
    x = logits / sampling["temperature"]
    step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, i)
    if kind == "topk":  # a draw among the k best alone: noise for k entries, not the whole vocabulary
        best, index = block_top_k(x, min(top_k, x.shape[-1]))
        choice = jax.vmap(jax.random.categorical)(step_keys, best)
        return jnp.take_along_axis(index, choice[:, None], axis=1)[:, 0].astype(jnp.int32)
    if kind == "topp":
        ordered = -jnp.sort(-x, axis=-1)
        probs = jax.nn.softmax(ordered, axis=-1)
        kept = (jnp.cumsum(probs, axis=-1) - probs) < sampling["top_p"]  # the most likely is always kept
        x = jnp.where(x < jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True), NEG_INF, x)
    return jax.vmap(jax.random.categorical)(step_keys, x).astype(jnp.int32)


def _greedy(model: Transformer, buffer_len: int, max_extra_len: int, variables, src, prefix=None,
            sampling=None, grammar=None, kind: str | None = None, top_k: int = 0, compact: bool = True,
            stage: str = "all", state=None):
    segments = search_segments(buffer_len)

    def choose(logits, i, rows):
        if sampling is None:
            return first_argmax(logits)
        return _sample(logits, jax.random.wrap_key_data(rows["keys"]), i, sampling, kind, top_k)

    def start():
        cfg = model.config
        batch, src_len = src.shape
        limits = output_limits(src, buffer_len, max_extra_len, cfg.pad_id)
        src_mask, encoded = _encode(model, variables, src)
        cache = init_cache(cfg, batch, src_len, segments[0])
        # Greedy only takes argmaxes, and log_softmax keeps each row's order: masked logits suffice.
        logits, cache = _decode_step(model, variables, cache, encoded, src_mask,
                                     jnp.full((batch,), BOS_ID, jnp.int32), normalize=False)
        # What each row brings to the loop (rows of a batch may leave it: `decode_rows`).
        rows = {"src_mask": src_mask, "limits": limits, "prefix": prefix,
                "keys": None if sampling is None else sampling["keys"]}
        constraint = None if grammar is None else grammar_lib.initial_state(grammar["words"])
        logits = constrain(logits, grammar, constraint, limits - 1)
        logits = force_prefix(force_eos(logits, limits <= 1), prefix_token(prefix, 0, limits <= 1))
        first = choose(logits, 0, rows)
        tokens = jnp.full((batch, buffer_len), PAD_ID, jnp.int32).at[:, 0].set(first)
        done = (first == EOS_ID) | (limits <= 1)
        done_at = jnp.where(done, 1, 0).astype(jnp.int32)
        return jnp.int32(1), tokens, done, done_at, advance_grammar(grammar, constraint, first), rows, cache

    def body(state):
        i, tokens, done, done_at, constraint, rows, cache = state
        limits = rows["limits"]
        previous = jax.lax.dynamic_index_in_dim(tokens, i - 1, axis=1, keepdims=False)
        logits, cache = _decode_step(model, variables, cache, None, rows["src_mask"], previous, normalize=False)
        logits = constrain(logits, grammar, constraint, limits - i - 1)
        logits = force_prefix(force_eos(logits, i + 1 >= limits),
                              prefix_token(rows["prefix"], i, i + 1 >= limits))
        token = jnp.where(done, PAD_ID, choose(logits, i, rows))
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, token, i, axis=1)
        finished = done | (token == EOS_ID) | (i + 1 >= limits)
        done_at = jnp.where(finished & ~done, i + 1, done_at)
        return i + 1, tokens, finished, done_at, advance_grammar(grammar, constraint, token), rows, cache

    def output(state, row_steps):
        i, tokens, _, done_at, _, _ = state
        return {"tokens": tokens, "steps": i, "done_at": done_at, "row_steps": row_steps}
    return search_stage(stage, segments, start, state, body, lambda state: ~state[2], output, compact)


@functools.lru_cache(maxsize=64)
def _compiled_greedy(config: TransformerConfig, buffer_len: int, max_extra_len: int, kind: str | None = None,
                     top_k: int = 0, compact: bool = True, stage: str = "all"):
    return jax.jit(functools.partial(_greedy, Transformer(config), buffer_len, max_extra_len, kind=kind,
                                     top_k=top_k, compact=compact, stage=stage))


def greedy_search(model, params, src, *, max_len: int | None = None, max_extra_len: int = 50,
                  prefix=None, grammar=None, staged: bool = False) -> jax.Array:
    """Greedy decoding of src [B,S] -> tokens int32 [B,L] (no BOS; EOS, then PAD).

    `max_len` caps the output length (EOS included) below the model's own max_len. At a row's limit EOS is
    forced. `grammar` ({"kinds": [V], "words": [B]}, see `jaxformer.grammar`) keeps each output a tree.
    `staged`: a `decode_rows.Dispatched` whose `result()` is the tokens (the searches take it too).
    """
    cfg = _config(model)
    src = jnp.asarray(src, jnp.int32)
    buffer_len = decode_buffer_len(src.shape[1], cfg, max_len=max_len, max_extra_len=max_extra_len)
    return dispatch(functools.partial(_compiled_greedy, cfg, buffer_len, int(max_extra_len)),
                    (_variables(params), src, as_prefix(prefix), None, as_grammar(grammar)),
                    lambda out: out["tokens"], staged)


def sample_search(model, params, src, keys, *, kind: str = "full", temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, max_len: int | None = None, max_extra_len: int = 50, prefix=None,
                  grammar=None, staged: bool = False) -> jax.Array:
    """Ancestral sampling of src [B,S] -> tokens [B,L], as greedy_search but each token drawn (see `_sample`):
    kind "full", "topk" (top_k tokens) or "topp" (top_p of the mass), at `temperature`. keys: one PRNG key per
    row ([B] typed keys or [B,2] key data); a row's sample depends on its key, not on the other rows."""
    if kind not in SAMPLING:
        raise ValueError(f"unknown sampling {kind!r}: choose one of {', '.join(SAMPLING)}")
    if not temperature > 0 or (kind == "topk" and int(top_k) < 1) or (kind == "topp" and not 0 < top_p <= 1):
        raise ValueError(f"sampling needs temperature > 0, top_k >= 1, 0 < top_p <= 1; got {temperature}, "
                         f"{top_k}, {top_p}")
    cfg = _config(model)
    src = jnp.asarray(src, jnp.int32)
    keys = jnp.asarray(keys)
    if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
        keys = jax.random.key_data(keys)
    buffer_len = decode_buffer_len(src.shape[1], cfg, max_len=max_len, max_extra_len=max_extra_len)
    fn = functools.partial(_compiled_greedy, cfg, buffer_len, int(max_extra_len), kind,
                           int(top_k) if kind == "topk" else 0)
    sampling = {"keys": keys, "temperature": jnp.float32(temperature), "top_p": jnp.float32(top_p)}
    return dispatch(fn, (_variables(params), src, as_prefix(prefix), sampling, as_grammar(grammar)),
                    lambda out: out["tokens"], staged)


# ----------------------------------------------------------------------------- beam search

def _gather_beams(x: jax.Array, indices: jax.Array) -> jax.Array:
    """x [B, K_in, ...], indices [B, K_out] -> [B, K_out, ...]; a dict of such arrays gathers each."""
    if isinstance(x, Mapping):
        return {name: _gather_beams(a, indices) for name, a in x.items()}
    return jnp.take_along_axis(x, indices.reshape(indices.shape + (1,) * (x.ndim - 2)), axis=1)


def _beam(model: Transformer, beam_size: int, buffer_len: int, max_extra_len: int, variables, src, alpha,
          prefix=None, grammar=None, stop: str = "bound", nbest: int = 1, compact: bool = True,
          stage: str = "all", state=None):
    k, n = beam_size, nbest
    alpha = jnp.asarray(alpha, jnp.float32)
    segments = search_segments(buffer_len)
    penalty = length_penalty if stop == "bound" else (lambda length, a: length ** a)  # fairseq / CTranslate2

    def select(i, log_probs, search, rows):
        """Extend the live beams by the token at position i (new length i + 1). log_probs [B,K,V]."""
        live_seqs, live_scores, fin_seqs, fin_scores, fin_log_probs, fin_count, done, done_at, constraint = search
        limits, prefix, vocab = rows["limits"], rows["prefix"], log_probs.shape[-1]
        length = (i + 1).astype(jnp.float32)
        at_limit = (i + 1 >= limits)[:, None]  # [B,1]
        log_probs = constrain(log_probs, grammar, constraint, (limits - i - 1)[:, None])
        log_probs = force_eos(log_probs, at_limit)  # only EOS at the limit, at its log-prob's cost (fairseq)
        log_probs = force_prefix(log_probs, prefix_token(prefix, i, at_limit[:, 0]))
        candidates = (live_scores[:, :, None] + log_probs).reshape(-1, k * vocab)
        top_scores, top_index = block_top_k(candidates, 2 * k)  # [B,2K]
        origin, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
        seqs = _gather_beams(live_seqs, origin)  # [B,2K,L]
        seqs = jax.lax.dynamic_update_index_in_dim(seqs, token, i, axis=2)
        valid = top_scores > NEG_INF / 2  # not an extension of a dead beam or a masked token
        is_eos = token == EOS_ID
        # A hypothesis is finished by EOS among the top K candidates (so K=1 follows the greedy path), or by
        # reaching the row's length limit (then every candidate ends in EOS and the best is finished).
        in_top_k = jnp.arange(2 * k)[None, :] < k
        finishing = valid & ((is_eos & in_top_k) | at_limit) & ~done[:, None]
        new_fin = jnp.where(finishing, top_scores / penalty(length, alpha), NEG_INF)
        # The N best finished so far, best first: the kept ones before the new ones, so a tie keeps the
        # earlier (shorter) hypothesis.
        fin_scores, best = jax.lax.top_k(jnp.concatenate([fin_scores, new_fin], axis=1), n)  # [B,N]
        fin_seqs = _gather_beams(jnp.concatenate([fin_seqs, seqs], axis=1), best)
        fin_log_probs = jnp.take_along_axis(jnp.concatenate([fin_log_probs, top_scores], axis=1), best, axis=1)
        # The K best non-EOS candidates stay live (there are at least K among the top 2K); none past the limit.
        live_candidates = jnp.where(is_eos | at_limit | ~valid, NEG_INF, top_scores)
        live_scores, keep = jax.lax.top_k(live_candidates, k)  # [B,K]
        live_seqs = _gather_beams(seqs, keep)
        if grammar is not None:
            constraint = _gather_beams(advance_grammar(grammar, _gather_beams(constraint, origin), token), keep)
        origin = jnp.take_along_axis(origin, keep, axis=1)
        if stop == "bound":
            # A live beam's score can only fall as it grows, and its final score is at most its log-prob over
            # the most favourable length penalty left (at the limit for alpha >= 0).
            remaining = [length_penalty(length + 1.0, alpha), length_penalty(limits.astype(jnp.float32), alpha)]
            bound = jnp.maximum(live_scores[:, 0] / remaining[0], live_scores[:, 0] / remaining[1])
            finished = fin_scores[:, -1] >= bound  # the N-th best cannot be beaten
        else:  # "finished": K hypotheses have ended, the rule of fairseq and CTranslate2 (patience 1)
            fin_count = fin_count + jnp.sum(finishing, axis=1, dtype=jnp.int32)
            finished = fin_count >= k
        now_done = done | (i + 1 >= limits) | finished | (live_scores[:, 0] <= NEG_INF / 2)
        done_at = jnp.where(now_done & ~done, i + 1, done_at)
        return (live_seqs, live_scores, fin_seqs, fin_scores, fin_log_probs, fin_count, now_done, done_at,
                constraint), origin

    def start():
        cfg = model.config
        batch, src_len = src.shape
        limits = output_limits(src, buffer_len, max_extra_len, cfg.pad_id)  # [B]
        # The first step runs on B rows: every beam starts from the same BOS, so the cross-attention
        # keys/values (and the BOS self-attention entry) are computed once per sentence; then K beams each.
        src_mask, encoded = _encode(model, variables, src)
        cache = init_cache(cfg, batch, src_len, segments[0])
        first_log_probs, cache = _decode_step(model, variables, cache, encoded, src_mask,
                                              jnp.full((batch,), BOS_ID, jnp.int32))
        search = (jnp.full((batch, k, buffer_len), PAD_ID, jnp.int32),  # live_seqs
                  jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (batch, 1)),  # one live beam
                  jnp.full((batch, n, buffer_len), PAD_ID, jnp.int32),  # fin_seqs, best first
                  jnp.full((batch, n), NEG_INF, jnp.float32),  # fin_scores
                  jnp.full((batch, n), NEG_INF, jnp.float32),  # fin_log_probs
                  jnp.zeros((batch,), jnp.int32),  # fin_count
                  jnp.zeros((batch,), bool),  # done
                  jnp.zeros((batch,), jnp.int32),  # done_at
                  None if grammar is None else grammar_lib.initial_state(
                      jnp.broadcast_to(jnp.asarray(grammar["words"])[:, None], (batch, k))))  # the grammar's state
        rows = {"src_mask": src_mask, "limits": limits, "prefix": prefix}  # what each row brings to the loop
        search, origin = select(jnp.int32(0), jnp.broadcast_to(first_log_probs[:, None, :],
                                                               (batch, k, first_log_probs.shape[-1])), search, rows)
        return jnp.int32(1), search, rows, reorder_beams(beam_search_cache(cache, k), origin)

    def body(state):
        i, search, rows, cache = state
        previous = jax.lax.dynamic_index_in_dim(search[0], i - 1, axis=2, keepdims=False)  # [B,K]
        log_probs, cache = _decode_step(model, variables, cache, None, rows["src_mask"], previous.reshape(-1))
        search, origin = select(i, log_probs.reshape(-1, k, log_probs.shape[-1]), search, rows)
        return i + 1, search, rows, reorder_beams(cache, origin)

    def output(state, row_steps):
        i, search, _ = state
        return {"tokens": search[2], "scores": search[3], "log_probs": search[4], "steps": i, "done_at": search[7],
                "row_steps": row_steps}
    return search_stage(stage, segments, start, state, body, lambda state: ~state[1][6], output, compact)


@functools.lru_cache(maxsize=64)
def _compiled_beam(config: TransformerConfig, beam_size: int, buffer_len: int, max_extra_len: int,
                   stop: str = "bound", nbest: int = 1, compact: bool = True, stage: str = "all"):
    return jax.jit(functools.partial(_beam, Transformer(config), beam_size, buffer_len, max_extra_len,
                                     stop=stop, nbest=nbest, compact=compact, stage=stage))


def beam_search(model, params, src, *, beam_size: int = 4, alpha: float = 0.6, max_extra_len: int = 50,
                max_len: int | None = None, stop: str = "bound", prefix=None,
                grammar=None) -> tuple[jax.Array, jax.Array]:
    """Beam search of src [B,S] -> (tokens int32 [B,L], scores float32 [B]): each row's best hypothesis.

    The score is the length-penalised log-prob (see module doc). With beam_size=1 and alpha=0 this is
    exactly greedy search; with alpha > 0 a single beam keeps searching after greedy's EOS and returns a
    longer hypothesis only if it scores higher. The loop stops once no live beam of any row can still
    beat that row's best finished hypothesis (stop="bound"), or once K hypotheses of the row have
    finished, scored by log-prob / len**alpha (stop="finished", CTranslate2's and fairseq's rule). At a
    row's length limit EOS is forced and its log-prob counted (fairseq).
    """
    out = beam_search_nbest(model, params, src, 1, beam_size=beam_size, alpha=alpha, max_extra_len=max_extra_len,
                            max_len=max_len, stop=stop, prefix=prefix, grammar=grammar)
    return out["tokens"][:, 0], out["scores"][:, 0]


def beam_search_nbest(model, params, src, nbest: int, *, beam_size: int = 4, alpha: float = 0.6,
                      max_extra_len: int = 50, max_len: int | None = None, stop: str = "bound",
                      prefix=None, grammar=None, staged: bool = False) -> dict:
    """`beam_search`'s N best finished hypotheses of each row, best first: {"tokens" [B,N,L], "scores" [B,N]
    (length-penalised), "log_probs" [B,N] (their sums of token log-probs, EOS included), ...}. N <= the beam
    size; with stop="bound" a row ends once no live beam can beat its N-th best. A row with fewer than N
    finished hypotheses has NEG_INF scores in the rest. `prefix` [B,P] (PAD after each row's prefix; no EOS)
    forces each output's first tokens, at their log-probs' cost; the search goes on from there. `staged`: as
    `greedy_search`'s."""
    cfg = _config(model)
    if int(beam_size) < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if not 1 <= int(nbest) <= int(beam_size):
        raise ValueError(f"nbest must be between 1 and the beam size {beam_size}, got {nbest}")
    if stop not in STOP_RULES:
        raise ValueError(f"decode.stop: unknown rule {stop!r}; choose one of {', '.join(STOP_RULES)}")
    src = jnp.asarray(src, jnp.int32)
    buffer_len = decode_buffer_len(src.shape[1], cfg, max_len=max_len, max_extra_len=max_extra_len)
    fn = functools.partial(_compiled_beam, cfg, int(beam_size), buffer_len, int(max_extra_len), stop, int(nbest))
    return dispatch(fn, (_variables(params), src, jnp.float32(alpha), as_prefix(prefix), as_grammar(grammar)),
                    lambda out: out, staged)


# ----------------------------------------------------------------------------- scoring

@functools.lru_cache(maxsize=16)
def _compiled_token_log_probs(config: TransformerConfig, full_softmax: bool):
    model = Transformer(config)

    def token_log_probs(variables, src, tokens):
        tgt_in = jnp.concatenate([jnp.full_like(tokens[:, :1], BOS_ID), tokens[:, :-1]], axis=1)
        logits = model.apply(variables, src, tgt_in)  # [B,T,V]
        log_probs = (jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1) if full_softmax
                     else search_log_probs(logits))
        chosen = jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]
        return jnp.where(tokens != PAD_ID, chosen, 0.0)

    return jax.jit(token_log_probs)


def token_log_probs(model, params, src, tokens, *, full_softmax: bool = False) -> jax.Array:
    """[B,T] log-prob of each token of `tokens` [B,T] (a target with its EOS, right-padded with PAD; 0 at
    PAD) given `src` [B,S], teacher-forced through the full (uncached) decoder. By default under the searches'
    distribution, PAD and BOS excluded from the softmax (they are never generated); `full_softmax=True`: over
    the whole vocabulary, as CTranslate2's `score_batch` and fairseq score (a model trained with label
    smoothing gives PAD and BOS some mass: ~1e-3 in log-prob on the offline default)."""
    return _compiled_token_log_probs(_config(model), bool(full_softmax))(
        _variables(params), jnp.asarray(src, jnp.int32), jnp.asarray(np.asarray(tokens, np.int32)))


def score_sequences(model, params, src, tokens, alpha: float = 0.6) -> jax.Array:
    """[B] length-penalised log-prob of `tokens` [B,T] (as the searches return them) given `src`,
    computed with the full (uncached) decoder and the searches' scoring."""
    tokens = np.asarray(tokens, np.int32)
    total = jnp.sum(token_log_probs(model, params, src, tokens), axis=-1)
    return total / length_penalty(jnp.asarray(np.sum(tokens != PAD_ID, axis=-1), jnp.float32), alpha)
