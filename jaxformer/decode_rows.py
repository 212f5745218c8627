"""Finished rows leave the batch: the search loop goes on with the live rows alone once few are left.

A batch runs until its last row is done, and a row that finished early would otherwise be computed at every
step until then (on the shared Multi30k model, beam 4, batches of 64: 1.85x the row-steps the rows need).
`compacting_loop` runs the search's growing-cache segments (`decode_cache.segmented_loop`); from the second
segment on, it stops as soon as at most 1/COMPACT_TO of the rows are live, gathers those rows (their search
state, their per-row inputs and their cache, grown to the full buffer) into a batch 1/COMPACT_TO the size,
finishes them in one more loop, and puts their results back in their rows. That loop hands over in turn,
once at most 1/COMPACT_TO of its rows are live, while the smaller batch keeps MIN_ROWS rows (batches of 64:
64, then 16, then 4). The tokens are the same, row for row (scores to float rounding: a smaller batch's
products may round differently); one more loop body is compiled per batch size, not one per segment: every
segment hands over to the same loop.

A search may also run as two programs (`search_stage`, `Dispatched`): the first segment, then the rest only
for a batch with live rows after it, so a batch that ends early never compiles the later segments and the
compaction loops (on short sentences, most of the search's compilation).

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


def _batch(state):
    """The rows of a loop state: axis 0 of its first array after the step."""
    return jax.tree.leaves(state[1:])[0].shape[0]


def _ended(state):
    """A loop that stops at `state`: (the state without its cache, the row-steps so far: steps x rows)."""
    return state[:-1], state[0] * _batch(state)


def _smaller(rows) -> int:
    """The batch the live rows of a `rows`-row batch go on in: 1/COMPACT_TO the size, or 0 (none) below
    MIN_ROWS rows or for a symbolic batch (jax.export)."""
    small = rows // COMPACT_TO if isinstance(rows, int) else 0
    return small if small >= MIN_ROWS else 0


def _rows(tree, idx):
    """The rows `idx` of every batch-major array of `tree` (scalars as they are)."""
    return jax.tree.map(lambda a: a if a.ndim == 0 else a[idx], tree)


def _put_back(full, part, idx):
    """`full` with rows `idx` replaced by `part`'s rows (scalars, the step count among them, from `part`)."""
    return jax.tree.map(lambda a, b: b if a.ndim == 0 else a.at[idx].set(b), full, part)


def first_segment(segments, state, body, live_rows):
    """`body` over `state` up to the first segment's end, or until no row is live: every search's start."""
    return jax.lax.while_loop(lambda s: (s[0] < segments[0]) & jnp.any(live_rows(s)), body, state)


def later_segments(segments, state, body, live_rows, compact: bool = True):
    """The rest of the loop for a `first_segment` state (its cache at the first segment's length): the later
    segments, and with `compact` the few live rows of a long search finishing in smaller batches (module
    doc). Returns (the state without its cache, the row-steps computed: steps x rows of every loop, the first
    step's rows included)."""
    batch = _batch(state)
    small = _smaller(batch)
    all_done = lambda s: ~jnp.any(live_rows(s))  # noqa: E731
    if len(segments) < 2:
        return _ended(state)
    if not compact or not small:
        out = segmented_loop(segments[1:], state[:-1] + (grow_cache(state[-1], segments[1]),), body, all_done)
        return out, out[0] * batch
    end = segments[-1]
    few = lambda rows: lambda s: jnp.sum(live_rows(s), dtype=jnp.int32) <= rows  # noqa: E731

    def hand_over(s, rows):
        """The live rows first (in order), `rows` of them, with the cache at the buffer's full length."""
        idx = jnp.argsort(~live_rows(s), stable=True)[:rows]
        part = _rows(s, idx)
        return s[:-1], part[:-1] + (grow_cache(part[-1], end),), idx

    def finish(s, rows, counted):
        """Run the `rows`-row state `s` (its cache at full length; `counted` row-steps up to its step) to the
        end, handing over to a batch a quarter the size again while that batch keeps MIN_ROWS rows."""
        start, sub = s[0], _smaller(rows)
        go = (lambda s: ~few(sub)(s)) if sub else (lambda s: ~all_done(s))  # noqa: E731
        s = jax.lax.while_loop(lambda s: (s[0] < end) & go(s), body, s)
        counted = counted + (s[0] - start) * rows
        if not sub:
            return s[:-1], counted

        def again(s):
            full, part, idx = hand_over(s, sub)
            part, total = finish(part, sub, counted)
            return _put_back(full, part, idx), total
        return jax.lax.cond(all_done(s) | (s[0] >= end), lambda s: (s[:-1], counted), again, s)

    def later(n, s):  # segments 1, 2, ...: stop early once few rows are live, then hand over
        s = jax.lax.while_loop(lambda s: (s[0] < segments[n]) & ~few(small)(s), body, s)
        if n + 1 == len(segments):
            return hand_over(s, small)
        return jax.lax.cond(few(small)(s), lambda s: hand_over(s, small),
                            lambda s: later(n + 1, s[:-1] + (grow_cache(s[-1], segments[n + 1]),)), s)

    full, part, idx = later(1, state[:-1] + (grow_cache(state[-1], segments[1]),))
    part, counted = finish(part, small, part[0] * batch)  # one loop per batch size, whatever the segment
    return _put_back(full, part, idx), counted


def compacting_loop(segments, state, body, live_rows, compact: bool = True):
    """Run `body` over `state` until no row is live (`live_rows(state)` -> bool [B]): `first_segment`, then
    `later_segments` in the same program when a row is still live. Returns (the state without its cache,
    the row-steps computed)."""
    state = first_segment(segments, state, body, live_rows)
    return jax.lax.cond(~jnp.any(live_rows(state)), _ended,
                        lambda s: later_segments(segments, s, body, live_rows, compact), state)


def search_stage(stage: str, segments, start, state, body, live_rows, output, compact: bool = True):
    """A search as one program (`stage` "all"), or as two, so that a batch that ends within the first
    segment never compiles the later ones (`Dispatched`): "start" runs `start()`'s state through the first
    segment -> (that state with its cache, whether no row is live, `output` of it); "rest" runs a "start"
    `state` to the end -> `output`. `output(state without cache, row_steps)` -> the search's outputs."""
    if stage == "rest":
        return output(*later_segments(segments, state, body, live_rows, compact))
    state = start()
    if stage == "all":
        return output(*compacting_loop(segments, state, body, live_rows, compact))
    state = first_segment(segments, state, body, live_rows)
    return state, ~jnp.any(live_rows(state)), output(*_ended(state))


class Dispatched:
    """A batch's search with its first segment dispatched (`search_stage` "start"). `later()` waits for that
    segment and returns None if the search ended there (`out` holds its outputs), else its later segments'
    outputs, dispatched (the "rest" program is compiled the first time a batch shape needs it). A batch driver
    keeps several of these in flight and calls `later()` on the oldest, so the device always has work queued."""

    def __init__(self, start, rest, post=lambda out: out):
        self.state, self.done, out = start()
        self.out, self._rest, self._post, self._later = post(out), rest, post, None

    def later(self):
        if self.state is not None:  # once: the cache is freed when the later segments are dispatched
            state, self.state = self.state, None
            self._later = None if bool(self.done) else self._post(self._rest(state))
        return self._later

    def result(self):
        """The search's outputs, as the one-program search returns them (after `post`)."""
        rest = self.later()
        return self.out if rest is None else rest


def dispatch(compiled, args, post, staged: bool):
    """`compiled(stage=...)` (a search's jitted function per stage) over `args`: as one program -> `post` of
    its outputs, or with `staged` a `Dispatched` search whose later segments are compiled and run only if the
    batch reaches them."""
    if not staged:
        return post(compiled()(*args))
    return Dispatched(lambda: compiled(stage="start")(*args), lambda state: compiled(stage="rest")(*args, state=state),
                      post)
