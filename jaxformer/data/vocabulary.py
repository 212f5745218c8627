"""The shared subword vocabulary: one sentencepiece BPE model for both languages.

Special ids, fixed for every vocabulary jaxformer trains or loads: PAD 0, UNK 1, BOS 2, EOS 3. A run
trains its model once (`get_tokenizer`) on a sample drawn uniformly from the whole training stream
(reservoir sampling), not on its first sentences: a corpus made of one sub-corpus after another (WMT14)
would otherwise get a vocabulary of its first domain.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Iterable

import numpy as np

from jaxformer.data import marian_vocab, word_vocab
from jaxformer.data.common import BOS_ID, EOS_ID, PAD_ID, UNK_ID, DataError, clean, output_ids, process_info
from jaxformer.data.sources import pair_batches

log = logging.getLogger(__name__)

VOCAB_FILENAME = "vocab.model"
# The names a run's vocabulary may have in its workdir, one per kind (sentencepiece, words, marian).
RUN_VOCABULARIES = (VOCAB_FILENAME, word_vocab.FILENAME, marian_vocab.DIRNAME)


class Tokenizer:
    """A sentencepiece model shared by both languages, with PAD/UNK/BOS/EOS = 0/1/2/3."""

    kind = "sentencepiece"  # the vocabulary kinds: see `load_vocabulary`

    def __init__(self, model_proto: bytes, path: str | None = None):
        import sentencepiece as spm

        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self.path = path
        ids = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
        if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise DataError(f"sentencepiece model {path or '<bytes>'} has pad/unk/bos/eos ids {ids}; jaxformer needs "
                            f"{(PAD_ID, UNK_ID, BOS_ID, EOS_ID)} (train it with pad_id=0 unk_id=1 bos_id=2 eos_id=3)")

    @classmethod
    def train(cls, sentences: Iterable[str], vocab_size: int, path: str) -> "Tokenizer":
        """Train a BPE model of about `vocab_size` pieces and write it to `path` (a .model file).

        The size is a soft limit: a small corpus gives a smaller vocabulary rather than an error.
        """
        import sentencepiece as spm

        count = 0

        def lines():
            nonlocal count
            for s in sentences:
                s = " ".join(s.split())  # one line each; sentencepiece reads newlines as separators
                if s:
                    count += 1
                    yield s

        buf = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=lines(), model_writer=buf, model_type="bpe", vocab_size=int(vocab_size),
                hard_vocab_limit=False, character_coverage=0.9999, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID,
                eos_id=EOS_ID, num_threads=min(16, os.cpu_count() or 1), minloglevel=2)
        except RuntimeError as e:
            raise DataError(f"training the vocabulary for {path} failed on {count} sentences: {e}") from e
        if count == 0:
            raise DataError(f"no sentences to train the vocabulary {path} from")
        tok = cls(buf.getvalue(), path)
        tok.save(path)
        if tok.vocab_size < vocab_size:
            log.warning("vocabulary %s has %d pieces, fewer than data.vocab_size=%d: the sample is small",
                        path, tok.vocab_size, vocab_size)
        log.info("trained a %d-piece BPE vocabulary on %d sentences: %s", tok.vocab_size, count, path)
        return tok

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        if not os.path.isfile(path):
            raise DataError(f"missing sentencepiece model {path}")
        with open(path, "rb") as f:
            return cls(f.read(), path)

    def save(self, path: str) -> None:
        """Write the model atomically, so a reader never sees half a file."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(self._proto)
        os.replace(tmp, path)
        self.path = path

    @property
    def serialized(self) -> bytes:
        """The model proto: what `Tokenizer(proto)` rebuilds it from (for export)."""
        return self._proto

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        """Subword ids of each text; no BOS/EOS added. Many texts are encoded in one call, on
        `num_threads` threads (-1: sentencepiece's default, every core)."""
        if isinstance(texts, str):
            raise TypeError("Tokenizer.encode takes a list of strings")
        texts = list(texts)
        if len(texts) <= 16:  # the batch call starts threads: slower for a pair than encoding one by one
            return [self._sp.encode(t) for t in texts]
        return self._sp.encode(texts, num_threads=num_threads)

    def encode_target(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        """Ids of target-side texts: the same model segments both languages."""
        return self.encode(texts, num_threads)

    def decode(self, ids) -> list[str]:
        """Text of each id sequence (list or array rows): stops at EOS, ignores PAD and BOS."""
        return [self._sp.decode(output_ids(seq)) for seq in ids]

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))


def vocabulary_filename(kind: str) -> str:
    """The file (sentencepiece, words) or folder (marian) a vocabulary of `kind` is kept as, in a workdir or
    export."""
    names = {Tokenizer.kind: VOCAB_FILENAME, marian_vocab.KIND: marian_vocab.DIRNAME,
             word_vocab.KIND: word_vocab.FILENAME}
    if kind not in names:
        raise DataError(f"unknown vocabulary kind {kind!r}; known: {', '.join(names)}")
    return names[kind]


def load_vocabulary(path: str, kind: str | None = None):
    """A `Tokenizer` (a sentencepiece .model file), a `MarianVocab` (a folder from `MarianVocab.save`) or a
    `WordVocab` (a .json file from `WordVocab.save`): `kind` names it, or None tells them apart by what
    `path` is."""
    if kind is None:
        kind = (marian_vocab.KIND if os.path.isdir(path) else word_vocab.KIND if str(path).endswith(".json")
                else Tokenizer.kind)
    if kind == marian_vocab.KIND:
        return marian_vocab.MarianVocab.load(path)
    if kind == word_vocab.KIND:
        return word_vocab.WordVocab.load(path)
    if kind != Tokenizer.kind:
        raise DataError(f"unknown vocabulary kind {kind!r} for {path}")
    return Tokenizer.load(path)


def run_vocabulary(workdir: str):
    """The vocabulary a run keeps in its workdir (vocab.model, vocab.words.json or a marian_vocab/ folder),
    or None."""
    for name in RUN_VOCABULARIES:
        path = os.path.join(workdir, name)
        if os.path.exists(path):
            return load_vocabulary(path)
    return None


def sample_sentences(data_cfg, n: int) -> list[str]:
    """Up to `n` sentences (both sides of n/2 pairs), a uniform sample of the whole unsharded train stream.

    Reservoir sampling seeded by data.seed: one pass, memory for the sample only.
    """
    k = max(1, int(n) // 2)
    rng = np.random.default_rng([int(data_cfg.seed), 7])
    reservoir: list[tuple[str, str]] = []
    seen = 0
    for sources, targets in pair_batches(data_cfg, "train", process_index=0, process_count=1):
        pairs = [(s, t) for s, t, reason in (clean(s, t) for s, t in zip(sources, targets)) if reason is None]
        take = min(len(pairs), max(0, k - len(reservoir)))
        reservoir += pairs[:take]
        if take < len(pairs):  # item number seen+i replaces a random slot with probability k/(seen+i+1)
            where = rng.integers(0, np.arange(seen + take, seen + len(pairs)) + 1)
            for i in np.flatnonzero(where < k):
                reservoir[int(where[i])] = pairs[take + int(i)]
        seen += len(pairs)
    return [s for pair in reservoir for s in pair][:int(n)]


def training_pairs(data_cfg):
    """Every clean (source, target) pair of the unsharded train split: what a word vocabulary counts."""
    for sources, targets in pair_batches(data_cfg, "train", process_index=0, process_count=1):
        for s, t in zip(sources, targets):
            s, t, reason = clean(s, t)
            if reason is None:
                yield s, t


def get_tokenizer(config, workdir: str, *, wait_timeout_s: float = 3600.0):
    """The run's vocabulary, kept in the workdir as `vocabulary_filename(data.vocab_kind)`.

    Resume: the vocabulary kept there (or the marian_vocab/ folder a fine-tuned Marian model keeps). Else
    `config.data.vocab_model` (copied beside the run). Else process 0 makes one: `data.vocab_kind`
    "sentencepiece" trains BPE on `config.data.vocab_sample_size` sentences sampled over the whole train
    stream; "words" (parsing) takes every target symbol and the source words seen `data.min_count` times in
    the whole train split. The other processes wait for the file (the workdir must be on a shared filesystem).
    """
    data = config.data
    kind = data.get("vocab_kind", Tokenizer.kind)
    path = os.path.join(workdir, vocabulary_filename(kind))
    kept = run_vocabulary(workdir)  # a Marian vocabulary is put there by fine-tuning (`train.init_from`)
    if kept is not None:
        return kept
    process_index, _ = process_info(None, None)
    if data.vocab_model:
        tok = load_vocabulary(data.vocab_model)
        if process_index == 0:
            tok.save(os.path.join(workdir, vocabulary_filename(tok.kind)))
        return tok
    if process_index == 0:
        if kind == word_vocab.KIND:
            vocab = word_vocab.WordVocab.build(training_pairs(data), min_count=int(data.min_count), path=path)
            log.info("built a %d-entry word vocabulary (%d target symbols, source words seen >= %d times): %s",
                     vocab.vocab_size, len(vocab.targets), int(data.min_count), path)
            return vocab
        if kind != Tokenizer.kind:
            raise DataError(f"data.vocab_kind={kind!r}: choose {Tokenizer.kind!r} (subwords) or "
                            f"{word_vocab.KIND!r} (whole words, for parsing)")
        log.info("training a vocabulary of %d pieces on up to %d sentences", data.vocab_size, data.vocab_sample_size)
        return Tokenizer.train(sample_sentences(data, int(data.vocab_sample_size)), int(data.vocab_size), path)
    deadline = time.monotonic() + wait_timeout_s
    while not os.path.isfile(path):
        if time.monotonic() > deadline:
            raise DataError(f"process {process_index} waited {wait_timeout_s:.0f}s for process 0 to write {path}; "
                            f"is the workdir on a filesystem all processes share?")
        time.sleep(2.0)
    return load_vocabulary(path, kind)
