"""What every stage of the data pipeline shares: the special ids, the error type, the process's shard."""

from __future__ import annotations

import numpy as np

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SKIP_REASONS = ("empty", "bad_utf8", "too_long")


def output_ids(seq) -> list[int]:
    """A decoded row's ids (list or array) as a vocabulary turns them into text: up to its first EOS,
    without PAD and BOS."""
    seq = [int(i) for i in np.asarray(seq).reshape(-1)]
    if EOS_ID in seq:
        seq = seq[:seq.index(EOS_ID)]
    return [i for i in seq if i not in (PAD_ID, BOS_ID)]


class DataError(ValueError):
    """A problem with the data or the data config, in one line naming the file, field or key."""


def process_info(process_index=None, process_count=None) -> tuple[int, int]:
    """(index, count) of this process's shard; jax's when not given."""
    if process_index is None or process_count is None:
        import jax  # only here: the data pipeline itself does not need jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} is not in [0, process_count={process_count})")
    return int(process_index), int(process_count)


def clean(src, tgt) -> tuple[str, str, str | None]:
    """Stripped pair and the reason to skip it (None: keep)."""
    src, tgt = (src or "").strip(), (tgt or "").strip()
    if not src or not tgt:
        return src, tgt, "empty"
    if "\ufffd" in src or "\ufffd" in tgt:
        return src, tgt, "bad_utf8"
    return src, tgt, None
