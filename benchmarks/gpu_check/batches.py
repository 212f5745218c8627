"""The library's batches for the parts, with or without `datasets` (the GPU image lacks it unless its wheel
came along)."""

from __future__ import annotations

import logging

from .context import Context, load_tokenizer


def batch_iterator(config, tokenizer, split: str, *, repeat: bool, shuffle: bool):
    """The library's batches of `split` on one device (`jaxformer.data.make_batches`); where `datasets` does not
    import, the library's token cache and `BatchIterator` over the split's two files read directly."""
    from jaxformer import data

    try:
        import datasets  # noqa: F401
    except Exception as e:  # noqa: BLE001
        logging.getLogger(__name__).warning("datasets does not import (%s): reading the files directly", e)
        return data.BatchIterator(lambda: _cache_read_directly(config, tokenizer, split), config.data, num_devices=1,
                                  repeat=repeat, shuffle=shuffle, seed=int(config.data.seed))
    return data.make_batches(config, tokenizer, split, repeat=repeat, shuffle=shuffle, num_devices=1,
                             process_index=0, process_count=1)


def _cache_read_directly(config, tokenizer, split: str):
    """`make_batches`' token cache (the library cleans, encodes and drops what is too long), its first pass fed
    by Python's file reading instead of `datasets`' text streams; a cache of its own (keyed "read directly")."""
    from jaxformer import data

    d = config.data
    prefix = d[f"{split}_files"]
    max_len = min(int(d.max_len), max(int(x) for x in d.bucket_lengths))
    description = {**data.describe_source(d, split), "read": "directly, without datasets"}
    key = data.cache_key(description, tokenizer.serialized, max_len, 0, 1)

    def pairs():
        with open(f"{prefix}.{d.src_lang}", encoding="utf-8") as f_src, \
                open(f"{prefix}.{d.tgt_lang}", encoding="utf-8") as f_tgt:
            yield list(f_src), list(f_tgt)  # clean() strips the line ends

    return data.open_or_build(data.cache_dir_for(config), key, pairs, tokenizer, max_len, description)


def first_batches(ctx: Context, config, split: str = "test"):
    """{"unpacked": ..., "packed": ...}: the first batch of `split` each way (host numpy)."""
    tokenizer = load_tokenizer(ctx)
    out = {}
    for layout, pack in (("unpacked", False), ("packed", True)):
        config.data.pack = pack
        out[layout] = next(iter(batch_iterator(config, tokenizer, split, repeat=False, shuffle=False)))
    return out
