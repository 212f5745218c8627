"""Everything between raw parallel text and the device batches, one stage per module:

    sources.py     text: a streaming HF `datasets.IterableDataset` of {'src', 'tgt'} (hub, files or the
                   offline task), this process's shard           -> load_split, read_pairs
    vocabulary.py  a shared sentencepiece BPE trained on a sample spread over the whole corpus
                                                                  -> Tokenizer, get_tokenizer
    marian_vocab.py  an imported Marian model's vocabulary (two sentencepiece models + vocab.json), in
                   jaxformer's ids                                -> MarianVocab
    word_vocab.py  whole words and tree symbols, one id each (parsing)   -> WordVocab
    treebank.py    Penn Treebank trees: read, normalize, linearize and back  (treebank data: sources.py)
    cache.py       the first pass: cleaned, batch-encoded pairs written to flat files, memory-mapped
                   afterwards, keyed by source + vocabulary + length limit   -> open_or_build
    batching.py    a seeded whole-corpus order per epoch -> packed rows or length buckets -> int32 batches
                   of a few fixed shapes, with an exact resumable position    -> BatchIterator
    prefetch.py    a background thread a few batches ahead of the device      -> Prefetcher

`make_batches` chains them for the trainer. Special ids: PAD 0, UNK 1, BOS 2, EOS 3. Pairs skipped
(counted in `BatchIterator.stats`, logged each epoch): `empty` (a blank side, a TSV line without a tab),
`bad_utf8` (bytes that are not UTF-8, read as U+FFFD), `too_long` (a side over min(data.max_len,
max(data.bucket_lengths)) tokens with EOS).

Multi-host: each process tokenizes, caches and batches its own shard; with data.pack=False processes
may be in different buckets (shapes) at one step, which `parallel.global_batches` pads to agree.
"""

from __future__ import annotations

import os

from jaxformer.data.batching import BatchIterator, batch_size_for, padding_efficiency
from jaxformer.data.cache import TokenCache, cache_key, open_or_build
from jaxformer.data.common import BOS_ID, EOS_ID, PAD_ID, UNK_ID, DataError, process_info
from jaxformer.data.prefetch import Prefetcher
from jaxformer.data.sources import describe_source, ensure_synthetic, load_split, pair_batches, read_pairs
from jaxformer.data.marian_vocab import MarianVocab
from jaxformer.data.word_vocab import WordVocab, is_parser
from jaxformer.data.vocabulary import (VOCAB_FILENAME, Tokenizer, get_tokenizer, load_vocabulary, run_vocabulary,
                                       sample_sentences, vocabulary_filename)

__all__ = ["BOS_ID", "EOS_ID", "PAD_ID", "UNK_ID", "VOCAB_FILENAME", "BatchIterator", "DataError", "Prefetcher",
           "MarianVocab", "TokenCache", "Tokenizer", "batch_size_for", "cache_dir_for", "ensure_synthetic", "get_tokenizer",
           "load_split", "load_vocabulary", "make_batches", "padding_efficiency", "read_pairs", "run_vocabulary", "sample_sentences",
           "vocabulary_filename", "WordVocab", "is_parser"]


def cache_dir_for(config) -> str:
    """data.cache_dir, or `<train.workdir>/data_cache` when it is empty."""
    return config.data.cache_dir or os.path.join(config.train.workdir, "data_cache")


def make_batches(config, tokenizer: Tokenizer, split: str, *, repeat: bool, shuffle: bool, num_devices: int = 1,
                 process_index: int | None = None, process_count: int | None = None) -> BatchIterator:
    """The trainer's entry point: this process's batches of `split`, through the token cache.

    The source is opened (and its files checked) now; the first pass that fills the cache runs at the
    first batch, and later iterators over the same source, vocabulary and length limit read the cache.
    """
    data = config.data
    process_index, process_count = process_info(process_index, process_count)
    load_split(data, split, process_index=process_index, process_count=process_count)  # checks the files now
    max_len = min(int(data.max_len), max(int(x) for x in data.bucket_lengths))
    description = describe_source(data, split)
    key = cache_key(description, tokenizer.serialized, max_len, process_index, process_count)
    directory = cache_dir_for(config)

    def cache():
        batches = lambda: pair_batches(data, split, process_index=process_index, process_count=process_count)  # noqa
        return open_or_build(directory, key, batches, tokenizer, max_len, description)

    return BatchIterator(cache, data, num_devices=num_devices, process_count=process_count, repeat=repeat,
                         shuffle=shuffle, seed=int(data.seed))
