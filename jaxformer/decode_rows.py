"""Finished rows leave the batch: the search loop goes on with the live rows alone once few are left.

A batch runs until its last row is done, and a row that finished early would otherwise be computed at every
step until then (on the shared Multi30k model, beam 4, batches of 64: 1.85x the row-steps the rows need).
`compacting_loop` runs the search's growing-cache segments (`decode_cache.segmented_loop`); from the second
segment on, it stops as soon as at most 1/COMPACT_TO of the rows are live, gathers those rows (their search
state, their per-row inputs and their cache, grown to the full buffer) into a batch 1/COMPACT_TO the size,
finishes them in one more loop, and puts their results back in their rows. The tokens are the same, row for
row (scores to float rounding: a smaller batch's products may round differently); one more loop body is
compiled, not one per segment: every segment hands over to the same loop.

State convention (the searches' loop state): (i, *rest, cache), i the int32 step; every array of `rest` and
of the cache with at least one axis has the batch's rows on axis 0, and scalars (the cache's step counters)
are shared by all rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxformer.decode_cache import grow_cache, segmented_loop

COMPACT_TO = 4  # the live rows go on alone once they are at most 1/COMPACT_TO of the batch
MIN_ROWS = 4  # ... and only while that smaller batch still has at least this many rows


def _rows(tree, idx):
    """The rows `idx` of every batch-major array of `tree` (scalars as they are)."""
    return jax.tree.map(lambda a: a if a.ndim == 0 else a[idx], tree)


def _put_back(full, part, idx):
    """`full` with rows `idx` replaced by `part`'s rows (scalars, the step count among them, from `part`)."""
    return jax.tree.map(lambda a, b: b if a.ndim == 0 else a.at[idx].set(b), full, part)


def compacting_loop(segments, state, body, live_rows, compact: bool = True):
    """Run `body` over `state` until no row is live (`live_rows(state)` -> bool [B]), as
    `segmented_loop(segments, state, body, all_done)`; with `compact`, the few live rows of a long search
    finish in a smaller batch (module doc). Returns (the state without its cache, the row-steps computed:
    steps x rows of every loop, the first step's rows included)."""
    batch = jax.tree.leaves(state[1:])[0].shape[0]
    small = batch // COMPACT_TO if isinstance(batch, int) else 0  # a symbolic batch (jax.export): no compaction
    all_done = lambda s: ~jnp.any(live_rows(s))  # noqa: E731
    if not compact or len(segments) < 2 or small < MIN_ROWS:
        out = segmented_loop(segments, state, body, all_done)
        return out, out[0] * batch
    few = lambda s: jnp.sum(live_rows(s), dtype=jnp.int32) <= small  # noqa: E731

    def hand_over(s):
        """The live rows first (in order), `small` of them, with the cache at the buffer's full length."""
        idx = jnp.argsort(~live_rows(s), stable=True)[:small]
        part = _rows(s, idx)
        return s[:-1], part[:-1] + (grow_cache(part[-1], segments[-1]),), idx

    def later(n, s):  # segments 1, 2, ...: stop early once few rows are live, then hand over
        s = jax.lax.while_loop(lambda s: (s[0] < segments[n]) & ~few(s), body, s)
        if n + 1 == len(segments):
            return hand_over(s)
        return jax.lax.cond(few(s), hand_over, lambda s: later(n + 1, s[:-1] + (grow_cache(s[-1], segments[n + 1]),)),
                            s)

    def go_on(s):
        full, part, idx = later(1, s[:-1] + (grow_cache(s[-1], segments[1]),))
        start = part[0]
        part = jax.lax.while_loop(lambda s: (s[0] < segments[-1]) & ~all_done(s), body, part)
        return _put_back(full, part[:-1], idx), start * batch + (part[0] - start) * small

    state = jax.lax.while_loop(lambda s: (s[0] < segments[0]) & ~all_done(s), body, state)
    return jax.lax.cond(all_done(state), lambda s: (s[:-1], s[0] * batch), go_on, state)
