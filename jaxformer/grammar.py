"""A grammar mask for linearized trees: every search output is one well-formed tree with a tag per word.

A parse is searched as a sequence of symbols (`jaxformer.data.treebank.linearize`): `(LABEL` opens a
constituent, `)` closes one, a part-of-speech tag stands for the next input word. The mask is on the scores,
so greedy search, beam search, sampling and n-best all keep to it inside their jitted loops:
  * an opening bracket only at the start (the root) or inside the root, only while words remain (a new
    constituent needs a word, so no search is left without a legal symbol), and only where the tree can
    still be finished within the search's length limit (a tag per word left, a ')' per open bracket, EOS);
  * a tag only inside a constituent, while words remain;
  * a closing bracket only inside a constituent, never right after its opening bracket (no empty
    constituent), and the root's only once every word has its tag;
  * end of sentence only once the root is closed (or for an empty input); at the search's length limit EOS
    stays allowed, as the searches force it there. So an output is cut off, not a tree, only when the limit
    leaves no room even for the flattest tree (the words' tags, two brackets and EOS).
Any other token (a word piece, PAD, BOS) is never allowed.

The vocabulary's symbols come as one kind per token id (`kinds`, [V] int32); the state is four small arrays
per hypothesis ([B] in greedy search, [B,K] in beam search), which beam search reorders with its beams.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import jax.numpy as jnp
import numpy as np

__all__ = ["OTHER", "OPEN", "CLOSE", "TAG", "END", "kinds_table", "initial_state", "allowed", "advance"]

OTHER, OPEN, CLOSE, TAG, END = range(5)  # the kinds of token ids


def kinds_table(vocab_size: int, opens: Iterable[int], close: int, tags: Iterable[int], eos: int) -> np.ndarray:
    """[V] int32: the kind of each token id (OPEN, CLOSE, TAG, END or OTHER)."""
    kinds = np.full((int(vocab_size),), OTHER, np.int32)
    for ids, kind in ((list(opens), OPEN), ([close], CLOSE), (list(tags), TAG), ([eos], END)):
        ids = np.asarray(ids, np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"grammar: token ids must be in [0, {vocab_size}), got {ids.min()}..{ids.max()}")
        if np.any(kinds[ids] != OTHER):
            raise ValueError("grammar: a token id is given two kinds (opening bracket, closing bracket, tag, EOS)")
        kinds[ids] = kind
    return kinds


def initial_state(words) -> dict:
    """The state before the first symbol, for inputs of `words` words ([B] or [B,K])."""
    words = jnp.asarray(words, jnp.int32)
    return {"depth": jnp.zeros_like(words), "words_left": words, "just_opened": jnp.zeros(words.shape, bool),
            "started": words == 0}  # an empty input has nothing to parse: it may end at once


def allowed(state: Mapping, kinds, room=None):
    """[..., V] bool: the token ids that may come next in each hypothesis of `state` ([...] arrays). `room`
    ([...] int): how many tokens may still follow the next one within the length limit (None: no limit);
    where it is 0, EOS is allowed too (the searches force it there)."""
    depth, left, opened, started = state["depth"], state["words_left"], state["just_opened"], state["started"]
    inside = depth > 0
    end = ~inside & (left == 0) & started
    can_open = (left > 0) & (inside | ~started)
    if room is not None:
        end = end | (room <= 0)
        can_open = can_open & (~started | (room >= left + depth + 2))  # then: tags, depth + 1 ')', EOS
    by_kind = jnp.stack([jnp.zeros_like(inside),  # OTHER
                         can_open,  # OPEN
                         inside & ~opened & ((depth > 1) | (left == 0)),  # CLOSE
                         inside & (left > 0),  # TAG
                         end], axis=-1)  # END
    return jnp.take(by_kind, jnp.asarray(kinds), axis=-1)


def advance(state: Mapping, token, kinds) -> dict:
    """The state after `token` ([...] int ids, one per hypothesis)."""
    kind = jnp.take(jnp.asarray(kinds), token)
    is_open, is_close = kind == OPEN, kind == CLOSE
    return {"depth": state["depth"] + is_open.astype(jnp.int32) - is_close.astype(jnp.int32),
            "words_left": state["words_left"] - (kind == TAG).astype(jnp.int32),
            "just_opened": is_open,
            "started": state["started"] | is_open}
