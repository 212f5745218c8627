"""The decoder's key/value caches for one-token-at-a-time decoding, behind two calls.

`MultiHeadAttention` in decode mode hands its projected query (and its key/value projections) to
`self_attention_step` or `cross_attention_step` and gets the attention output back; what the cache holds,
and how beams share it, is decided here, so no layer of the model knows about beams.

* Keys and values are stored head-major, [B,H,S,d], so that each step's two (batched matrix-vector)
  products read them in place (a [B,S,H,d] cache made XLA transpose it on every step).
* Cross-attention keys/values are computed on the first step (when the encoder output is given) and read
  from the cache afterwards. They are stored once per sentence: in beam search the K beams of a sentence
  (K consecutive query rows) read them in one product, as extra query positions.
* Beam search's self-attention cache (`beam_search_cache`) gives every position K slots, written once and
  never moved; a small [B,K,L] index `beam_slots` says which slot holds each earlier position of each
  beam, and is all that follows the beams when they are reordered (`reorder_beams`). Copying the whole
  cache by beam origin each step cost more than the step's attention.
* The self-attention cache grows with the search (`search_segments`, `segmented_loop`): 16 positions, then
  32, ..., then the output buffer, so early steps attend over the positions reached, not the whole buffer.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp

from jaxformer.attention import _MASKED, attend_head_major


def _head_major(x):
    """[B,T,H,d] -> [B,H,T,d]."""
    return jnp.swapaxes(x, 1, 2)


def cross_attention_step(mod, query, memory, project_keys_values, mask):
    """Cross-attention of one decode step. query [N,1,H,K] with N = B or B·beams; memory [B,S,D] on the
    first step (its keys/values are computed and cached), None afterwards; mask [B,1,1,S]."""
    initializing = not mod.has_variable("cache", "cross_key")
    if memory is not None:
        key, value = (_head_major(a) for a in project_keys_values(memory))
    cached_key = mod.variable("cache", "cross_key", lambda: jnp.zeros_like(key))
    cached_value = mod.variable("cache", "cross_value", lambda: jnp.zeros_like(value))
    if memory is not None:
        if not initializing:
            cached_key.value, cached_value.value = key, value
    else:
        key, value = cached_key.value, cached_value.value
    sentences, rows = key.shape[0], query.shape[0]
    if rows != sentences:  # the beams of a sentence become extra query positions against its keys
        query = query.reshape((sentences, (rows // sentences) * query.shape[1]) + query.shape[2:])
    out = attend_head_major(query, key, value, mask)
    return out.reshape((rows, out.shape[1] * sentences // rows) + out.shape[2:])


def self_attention_step(mod, query, key, value):
    """Causal self-attention of one decode step: append this step's key/value [N,1,H,d] to the cache and
    attend to positions 0..step. On init (query [B,L,...]) the cache is made for L positions."""
    if mod.has_variable("cache", "beam_slots"):
        return _beam_self_attention_step(mod, query, key, value)
    initializing = not mod.has_variable("cache", "cached_key")
    cached_key = mod.variable("cache", "cached_key", lambda: jnp.zeros_like(_head_major(key)))
    cached_value = mod.variable("cache", "cached_value", lambda: jnp.zeros_like(_head_major(value)))
    cache_index = mod.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))
    if initializing:
        return attend_head_major(query, _head_major(key), _head_major(value))
    if query.shape[1] != 1:
        raise ValueError(f"decode mode takes one token per step, got a length of {query.shape[1]}")
    index = cache_index.value
    keys = jax.lax.dynamic_update_slice(cached_key.value, _head_major(key), (0, 0, index, 0))
    values = jax.lax.dynamic_update_slice(cached_value.value, _head_major(value), (0, 0, index, 0))
    cached_key.value, cached_value.value, cache_index.value = keys, values, index + 1
    seen = (jnp.arange(keys.shape[2]) <= index)[None, None, None, :]  # the new query sees positions 0..index
    return attend_head_major(query, keys, values, seen)


def _beam_self_attention_step(mod, query, key, value):
    """One beam-search step of self-attention against the slot cache, without moving keys or values.

    Slot k of position t holds the key/value of the beam that sat in row k when it was fed at step t.
    Each beam's query scores every slot of its sentence at once ([K, d] x [d, L*K] per sentence and head,
    keys stored [B,H,d,L*K] and values [B,H,L*K,d_v], the layouts the two products read without a
    transpose) and keeps, per position, the slot of its own history. query/key/value [B*K,1,H,d].
    """
    slots = mod.variable("cache", "beam_slots", jnp.zeros, (), jnp.int32)
    cached_key = mod.variable("cache", "cached_key", jnp.zeros, (), key.dtype)
    cached_value = mod.variable("cache", "cached_value", jnp.zeros, (), value.dtype)
    cache_index = mod.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))
    batch, k, length = slots.value.shape
    if query.shape[1] != 1 or query.shape[0] != batch * k:
        raise ValueError(f"beam decode steps take one token for each of {k} beams of {batch} sentences, got "
                         f"{query.shape[:2]}")
    index = cache_index.value
    by_sentence = lambda a: jnp.swapaxes(a.reshape((batch, k) + a.shape[2:]), 1, 2)  # noqa: E731 [B,H,K,d]
    keys = jax.lax.dynamic_update_slice(cached_key.value, jnp.swapaxes(by_sentence(key), 2, 3),
                                        (0, 0, 0, index * k))
    values = jax.lax.dynamic_update_slice(cached_value.value, by_sentence(value), (0, 0, index * k, 0))
    history = jax.lax.dynamic_update_slice(
        slots.value, jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32)[None, :, None], (batch, k, 1)),
        (0, 0, index))
    cached_key.value, cached_value.value, slots.value = keys, values, history
    cache_index.value = index + 1

    scores = jnp.einsum("bhkd,bhdn->bhkn", by_sentence(query), keys, preferred_element_type=jnp.float32)
    # Beam k's own slot of each position reached, as a mask over the L*K slots (other beams' slots and
    # positions not reached yet get no weight): one softmax over the slots, no select into [B,H,K,L] first.
    mine = (history[:, :, :, None] == jnp.arange(k, dtype=jnp.int32)) & (jnp.arange(length) <= index)[:, None]
    logits = jnp.where(mine.reshape(batch, 1, k, length * k), scores * jnp.float32(1.0 / math.sqrt(query.shape[-1])),
                       jnp.float32(_MASKED))
    weights = jax.nn.softmax(logits, axis=-1).astype(values.dtype)  # [B,H,K,L*K]
    out = jnp.einsum("bhkn,bhnv->bhkv", weights, values, preferred_element_type=jnp.float32)
    return jnp.swapaxes(out, 1, 2).reshape(query.shape[:2] + out.shape[1:2] + out.shape[3:]).astype(query.dtype)


def beam_search_cache(cache, beams: int):
    """The cache of a first decode step on B rows (one per sentence) made into the cache of beam steps on
    B*beams rows: every self-attention position gets `beams` slots (keys [B,H,L,d] -> [B,H,d,L*K], values
    -> [B,H,L*K,d]), plus `beam_slots` [B,K,L]; the first step's entry (position 0, the BOS every beam
    shares) goes to slot 0, which every beam's history names. Cross-attention keys/values stay one per
    sentence."""
    def convert(tree):
        if not isinstance(tree, Mapping):
            return tree
        tree = {name: convert(sub) for name, sub in tree.items()}
        if "cached_key" in tree:
            key, value = tree["cached_key"], tree["cached_value"]  # [B, H, L, d]; only position 0 is written
            length = key.shape[2]
            # Position 0's entry in slot 0 (every beam's history points there), the other slots empty.
            tree["cached_key"] = jnp.pad(jnp.swapaxes(key[:, :, :1], 2, 3),
                                         [(0, 0), (0, 0), (0, 0), (0, length * beams - 1)])
            tree["cached_value"] = jnp.pad(value[:, :, :1], [(0, 0), (0, 0), (0, length * beams - 1), (0, 0)])
            tree["beam_slots"] = jnp.zeros((key.shape[0], beams, length), jnp.int32)
        return tree
    return convert(cache)


def grow_cache(cache, length: int):
    """The self-attention caches padded to hold `length` positions (a search segment's cache length: a step
    attends over the positions the search has reached, not the whole output buffer). Cross-attention
    entries and counters are unchanged; the new positions are masked until written."""
    def pad(x, axis, size):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, size - x.shape[axis])
        return jnp.pad(x, widths)

    def convert(tree):
        if not isinstance(tree, Mapping):
            return tree
        tree = {name: convert(sub) for name, sub in tree.items()}
        if "beam_slots" in tree:  # keys [B,H,d,T*K], values [B,H,T*K,d], slots [B,K,T]
            beams = tree["beam_slots"].shape[1]
            tree["cached_key"] = pad(tree["cached_key"], 3, length * beams)
            tree["cached_value"] = pad(tree["cached_value"], 2, length * beams)
            tree["beam_slots"] = pad(tree["beam_slots"], 2, length)
        elif "cached_key" in tree:  # [B,H,T,d]
            tree["cached_key"] = pad(tree["cached_key"], 2, length)
            tree["cached_value"] = pad(tree["cached_value"], 2, length)
        return tree
    return convert(cache)


def reorder_beams(cache, origin: jax.Array):
    """Give each new live beam the history of the beam it extends (origin [B,K]): only `beam_slots` moves;
    keys/values stay in their slots, cross-attention entries and step counters are shared."""
    def gather(path, x):
        names = [getattr(key, "key", str(key)) for key in path]
        if names and names[-1] == "beam_slots":
            return jnp.take_along_axis(x, origin[:, :, None], axis=1)
        return x
    return jax.tree_util.tree_map_with_path(gather, cache)


# ----------------------------------------------------------------------------- the cache grows with the search

FIRST_SEGMENT = 16  # the first cache length of a search (see `search_segments`)


def search_segments(buffer_len: int) -> tuple[int, ...]:
    """The cache lengths a search grows through: FIRST_SEGMENT, doubling, then the buffer length L (a last
    doubling within 1.5x of L is merged into it). Steps before position T attend over a T-position cache,
    not the whole L-position buffer; each segment is one `while_loop` of the same compiled step."""
    bounds, length = [], FIRST_SEGMENT
    while length < buffer_len:
        bounds.append(length)
        length *= 2
    if bounds and buffer_len < 1.5 * bounds[-1]:
        bounds.pop()
    return tuple(bounds) + (int(buffer_len),)


def segmented_loop(segments, state, body, all_done):
    """Run `body` over state = (i, ..., cache) while i < the segment's end and not `all_done(state)`, segment
    by segment, the cache grown between segments; a search that is done skips the later segments (their
    larger caches are never made). Returns the state without the cache."""
    def run(n, state):
        state = jax.lax.while_loop(lambda s: (s[0] < segments[n]) & ~all_done(s), body, state)
        if n + 1 == len(segments):
            return state[:-1]
        grown = lambda s: run(n + 1, s[:-1] + (grow_cache(s[-1], segments[n + 1]),))  # noqa: E731
        return jax.lax.cond(all_done(state), lambda s: s[:-1], grown, state)
    return run(0, state)
