"""Everything between raw parallel text and the device batches.

Flow: a streaming Hugging Face `datasets.IterableDataset` of `{'src', 'tgt'}` strings
(`load_split`: a hub dataset, local files, or the generated offline task, all through
the same `datasets` API and the same mapping) -> one process's shard
(`split_dataset_by_node`) -> filtering with counters -> a shared sentencepiece BPE
vocabulary (`Tokenizer`, `get_tokenizer`) -> a seeded shuffle buffer -> length buckets
holding about `data.tokens_per_batch / process_count` tokens per side -> int32 numpy
batches of a few fixed shapes (`BatchIterator`, `make_batches`).

Special ids, fixed for every vocabulary jaxformer trains or loads:
    PAD_ID = 0   padding; the loss and attention ignore it
    UNK_ID = 1   a piece the vocabulary does not cover
    BOS_ID = 2   first decoder input (the "shifted right" start symbol)
    EOS_ID = 3   ends every source and every target label sequence

Batch format (`BatchIterator`), all int32 [B, L], padded with PAD_ID:
    src      source tokens + EOS
    tgt_in   BOS + target tokens    (decoder input)
    tgt_out  target tokens + EOS    (labels)
  with data.pack=True also src_segments/tgt_segments (1, 2, ... per packed pair, 0 on
  padding) and src_positions/tgt_positions (restarting at 0 for each pair).
L is one of data.bucket_lengths (with pack=True always the largest); B is
tokens_per_batch // process_count // L rounded down to a multiple of the local device
count, so there are at most len(bucket_lengths) shapes and `jit` compiles that often.

Skipped, counted in `BatchIterator.stats` and logged at each epoch's end:
    empty      a side is blank after stripping (or a TSV line has no tab)
    bad_utf8   a side had bytes that are not UTF-8 (read as U+FFFD, so a literal
               U+FFFD in the data counts here too)
    too_long   a side exceeds min(data.max_len, max(data.bucket_lengths)) tokens with EOS

Resuming: `BatchIterator.state_dict()` is JSON: the HF dataset's own `state_dict()`
(its position in the stream), our shuffle buffer and part-filled buckets as token ids,
the numpy rng state, the epoch and the counters. Loading it into a fresh iterator over
the same data yields exactly the batches the saved one would have yielded next.

Multi-host note: each process batches its own shard, so at one step processes may be
in different buckets (shapes). Train multi-host with data.pack=True (one shape), or
agree on shapes in the trainer; with repeat=False, shards may also give processes
different batch counts.
"""

from __future__ import annotations

import base64
import copy
import io
import logging
import os
import time
from collections.abc import Iterable, Iterator

import numpy as np

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

log = logging.getLogger(__name__)

_SPLITS = {  # split -> (config key of the hub split name, config key of the local files)
    "train": ("train_split", "train_files"),
    "valid": ("valid_split", "valid_files"),
    "test": ("test_split", "test_files"),
}
_SKIP_REASONS = ("empty", "bad_utf8", "too_long")
_STATE_VERSION = 1
VOCAB_FILENAME = "vocab.model"


class DataError(ValueError):
    """A problem with the data or the data config, in one line naming the file, field or key."""


# ----------------------------------------------------------------------------- sources


def _split_keys(split: str) -> tuple[str, str]:
    if split not in _SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {sorted(_SPLITS)}")
    return _SPLITS[split]


def _process_info(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only here: the data pipeline itself does not need jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} is not in [0, process_count={process_count})")
    return int(process_index), int(process_count)


def load_split(data_cfg, split: str, *, process_index=None, process_count=None):
    """Streaming `datasets.IterableDataset` of `{'src': str, 'tgt': str}` for this process.

    `split` is 'train', 'valid' or 'test'; `data_cfg` is `config.data`. The process's shard
    comes from `datasets.distributed.split_dataset_by_node` (defaults: jax's process index
    and count). Strings are raw: filtering happens in `BatchIterator`, where it is counted.
    """
    from datasets.distributed import split_dataset_by_node

    process_index, process_count = _process_info(process_index, process_count)
    ds = _load_unsharded(data_cfg, split)
    if process_count > 1:
        ds = split_dataset_by_node(ds, rank=process_index, world_size=process_count)
    return ds


def _load_unsharded(data_cfg, split: str):
    split_key, files_key = _split_keys(split)
    source = data_cfg.source
    if source == "hub":
        import datasets

        name, config, hub_split = data_cfg.hub_name, data_cfg.hub_config or None, data_cfg[split_key]
        if not name:
            raise DataError("data.hub_name is empty; name a Hugging Face dataset (e.g. 'wmt14') with data.source='hub'")
        ds = datasets.load_dataset(name, config, split=hub_split, streaming=True)
        return _to_pairs(ds, data_cfg, f"hub dataset {name!r} (config {config!r}, split {hub_split!r})")
    if source == "files":
        spec = data_cfg[files_key]
        if not spec:
            raise DataError(f"data.{files_key} is empty; set it to a prefix of aligned files (<prefix>."
                            f"{data_cfg.src_lang}, <prefix>.{data_cfg.tgt_lang}) or a .tsv/.jsonl/.parquet file")
        return _load_files(spec, data_cfg, f"data.{files_key}")
    if source == "synthetic":
        prefix = os.path.join(ensure_synthetic(data_cfg), split)
        return _load_files(prefix, data_cfg, "data.synthetic_dir")
    raise DataError(f"data.source={source!r} is not one of 'hub', 'files', 'synthetic'")


def _count_lines(path: str) -> int:
    """Lines as the `text` builder splits them (universal newlines), without holding the file."""
    n, last = 0, "\n"
    with open(path, encoding="utf-8", errors="replace") as f:
        while chunk := f.read(1 << 22):
            n += chunk.count("\n")
            last = chunk[-1]
    return n + (last != "\n")


def _text_column(path: str, column: str):
    import datasets

    ds = datasets.load_dataset("text", data_files={"train": path}, split="train", streaming=True,
                               encoding_errors="replace")
    return ds.rename_column("text", column)


def _load_files(spec: str, data_cfg, key: str):
    """Aligned `<spec>.<lang>` text files, or one .tsv / .jsonl / .json / .parquet file."""
    import datasets

    src_lang, tgt_lang = data_cfg.src_lang, data_cfg.tgt_lang
    src_path, tgt_path = f"{spec}.{src_lang}", f"{spec}.{tgt_lang}"
    if os.path.isfile(src_path) or os.path.isfile(tgt_path):
        for path in (src_path, tgt_path):
            if not os.path.isfile(path):
                raise DataError(f"missing file {path} ({key}={spec!r} needs both {src_path} and {tgt_path})")
        n_src, n_tgt = _count_lines(src_path), _count_lines(tgt_path)
        if n_src != n_tgt:
            raise DataError(f"parallel files differ in length: {src_path} has {n_src} lines, "
                            f"{tgt_path} has {n_tgt} lines ({key}={spec!r})")
        if n_src == 0:
            raise DataError(f"parallel files {src_path} and {tgt_path} are empty ({key}={spec!r})")
        # Horizontal concatenation zips the two streams and keeps them aligned (never re-sharded).
        return datasets.concatenate_datasets([_text_column(src_path, "src"), _text_column(tgt_path, "tgt")], axis=1)
    if not os.path.exists(spec):
        raise DataError(f"missing file: neither {spec} nor the aligned pair {src_path} / {tgt_path} exists "
                        f"({key}={spec!r})")
    if os.path.getsize(spec) == 0:
        raise DataError(f"file {spec} is empty ({key})")
    ext = os.path.splitext(spec[:-3] if spec.endswith(".gz") else spec)[1].lower()
    if ext == ".tsv":  # src<TAB>tgt per line, no header; a tab inside the target is kept
        ds = _text_column(spec, "line")

        def split_tab(ex):
            src, tab, tgt = ex["line"].partition("\t")
            return {"src": src, "tgt": tgt} if tab else {"src": "", "tgt": ""}

        return ds.map(split_tab).select_columns(["src", "tgt"])
    if ext in (".jsonl", ".json", ".parquet"):
        builder = "parquet" if ext == ".parquet" else "json"
        # (the json builder only applies encoding_errors when re-encoding from a non-"utf-8" name)
        kwargs = {} if builder == "parquet" else {"encoding": "utf-8-sig", "encoding_errors": "replace"}
        ds = datasets.load_dataset(builder, data_files={"train": spec}, split="train", streaming=True, **kwargs)
        return _to_pairs(ds, data_cfg, f"file {spec}")
    raise DataError(f"{key}={spec!r}: unsupported file type {ext!r}; use aligned <prefix>.{src_lang}/"
                    f"<prefix>.{tgt_lang} files, .tsv, .jsonl/.json or .parquet")


def _to_pairs(ds, data_cfg, origin: str):
    """Map the WMT layout `{field: {lang: text}}` or the flat `{lang: text}` one to `{'src','tgt'}`.

    The layout is read off the first example, so a dataset without the fields fails here,
    with the fields it does have, rather than somewhere inside training.
    """
    src, tgt, field = data_cfg.src_lang, data_cfg.tgt_lang, data_cfg.hub_field
    try:
        first = next(iter(ds), None)
    except Exception as e:  # unreadable file: name it instead of showing a parser traceback
        raise DataError(f"cannot read {origin}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if first is None:
        raise DataError(f"{origin} has no examples")
    if field and isinstance(first.get(field), dict):
        inner = first[field]
        missing = [lang for lang in (src, tgt) if lang not in inner]
        if missing:
            raise DataError(f"{origin}: field {field!r} has languages {sorted(inner)}, not {missing} "
                            f"(data.src_lang={src!r}, data.tgt_lang={tgt!r})")

        def pick(ex):
            pair = ex.get(field) or {}
            return {"src": pair.get(src) or "", "tgt": pair.get(tgt) or ""}
    elif src in first and tgt in first:
        def pick(ex):
            return {"src": ex.get(src) or "", "tgt": ex.get(tgt) or ""}
    else:
        raise DataError(f"{origin}: expected field {field!r} (data.hub_field) holding {{{src!r}, {tgt!r}}} or "
                        f"top-level fields {src!r} and {tgt!r}; the examples have fields {sorted(first)}")
    out = ds.map(pick)
    return out.select_columns(["src", "tgt"])


def ensure_synthetic(data_cfg) -> str:
    """Generate the offline number-words task once (per size and seed); returns its folder."""
    from jaxformer import synthetic

    langs = {data_cfg.src_lang, data_cfg.tgt_lang}
    if langs != {"en", "de"}:
        raise DataError(f"data.source='synthetic' is English<->German; data.src_lang/tgt_lang are "
                        f"{data_cfg.src_lang!r}/{data_cfg.tgt_lang!r}")
    n_train, seed = int(data_cfg.synthetic_size), int(data_cfg.seed)
    n_eval = min(1000, max(100, n_train // 20))
    base = data_cfg.get("synthetic_dir", "") or "runs/synthetic_data"
    directory = os.path.join(base, f"numbers-n{n_train}-s{seed}")
    done = os.path.join(directory, "COMPLETE")
    if not os.path.exists(done):
        log.info("writing the synthetic number-words task to %s", directory)
        synthetic.write_synthetic(directory, n_train, n_eval, n_eval, seed)
        with open(done, "w") as f:
            f.write(f"train={n_train} valid={n_eval} test={n_eval} seed={seed}\n")
    return directory


def _clean(src, tgt) -> tuple[str, str, str | None]:
    """Stripped pair and the reason to skip it (None: keep)."""
    src, tgt = (src or "").strip(), (tgt or "").strip()
    if not src or not tgt:
        return src, tgt, "empty"
    if "\ufffd" in src or "\ufffd" in tgt:
        return src, tgt, "bad_utf8"
    return src, tgt, None


def read_pairs(data_cfg, split: str, limit: int | None = None) -> list[tuple[str, str]]:
    """All (or the first `limit`) raw (src, tgt) pairs of a split, unsharded: for BLEU.

    Empty and non-UTF-8 pairs are dropped, as in training; no length limit is applied.
    """
    out = []
    for ex in load_split(data_cfg, split, process_index=0, process_count=1):
        if limit is not None and len(out) >= limit:
            break
        src, tgt, reason = _clean(ex["src"], ex["tgt"])
        if reason is None:
            out.append((src, tgt))
    return out


# ----------------------------------------------------------------------------- vocabulary


class Tokenizer:
    """A sentencepiece model shared by both languages, with PAD/UNK/BOS/EOS = 0/1/2/3."""

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

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Subword ids of each text; no BOS/EOS added."""
        if isinstance(texts, str):
            raise TypeError("Tokenizer.encode takes a list of strings")
        texts = list(texts)
        if len(texts) <= 16:  # the batch call starts threads: slower for a pair than encoding one by one
            return [self._sp.encode(t) for t in texts]
        return self._sp.encode(texts)

    def decode(self, ids) -> list[str]:
        """Text of each id sequence (list or array rows): stops at EOS, ignores PAD and BOS."""
        out = []
        for seq in ids:
            seq = [int(i) for i in np.asarray(seq).reshape(-1)]
            if EOS_ID in seq:
                seq = seq[:seq.index(EOS_ID)]
            out.append(self._sp.decode([i for i in seq if i not in (PAD_ID, BOS_ID)]))
        return out

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))


def _sample_sentences(data_cfg, n: int) -> Iterator[str]:
    """Up to `n` sentences, both sides, from the start of the (unsharded) train stream."""
    taken = 0
    for ex in load_split(data_cfg, "train", process_index=0, process_count=1):
        src, tgt, reason = _clean(ex["src"], ex["tgt"])
        if reason is not None:
            continue
        for s in (src, tgt):
            if taken >= n:
                return
            taken += 1
            yield s


def get_tokenizer(config, workdir: str, *, wait_timeout_s: float = 3600.0) -> Tokenizer:
    """The run's vocabulary, kept at `<workdir>/vocab.model`.

    Resume: that file. Else `config.data.vocab_model` (copied beside the run). Else process 0
    trains one on `config.data.vocab_sample_size` sentences of the train stream; the other
    processes wait for the file (the workdir must be on a shared filesystem).
    """
    data = config.data
    path = os.path.join(workdir, VOCAB_FILENAME)
    if os.path.isfile(path):
        return Tokenizer.load(path)
    process_index, _ = _process_info(None, None)
    if data.vocab_model:
        tok = Tokenizer.load(data.vocab_model)
        if process_index == 0:
            tok.save(path)
        return tok
    if process_index == 0:
        log.info("training a vocabulary of %d pieces on up to %d sentences", data.vocab_size, data.vocab_sample_size)
        return Tokenizer.train(_sample_sentences(data, int(data.vocab_sample_size)), int(data.vocab_size), path)
    deadline = time.monotonic() + wait_timeout_s
    while not os.path.isfile(path):
        if time.monotonic() > deadline:
            raise DataError(f"process {process_index} waited {wait_timeout_s:.0f}s for process 0 to write {path}; "
                            f"is the workdir on a filesystem all processes share?")
        time.sleep(2.0)
    return Tokenizer.load(path)


# ----------------------------------------------------------------------------- batching


def batch_size_for(length: int, tokens_per_batch: int, num_devices: int = 1, process_count: int = 1) -> int:
    """Rows per process for bucket `length`: ~tokens_per_batch/process_count tokens, a multiple of num_devices."""
    rows = max(1, int(tokens_per_batch) // int(process_count) // int(length))
    return max(num_devices, rows // num_devices * num_devices)


def _encode_seqs(seqs: list[list[int]]) -> dict:
    """Token sequences as compact JSON: base64 of int32 lengths and of the concatenation."""
    lengths = np.asarray([len(s) for s in seqs], np.int32)
    flat = np.fromiter((t for s in seqs for t in s), np.int32, count=int(lengths.sum()))
    return {"lengths": base64.b64encode(lengths.tobytes()).decode(),
            "tokens": base64.b64encode(flat.tobytes()).decode()}


def _decode_seqs(d: dict) -> list[list[int]]:
    lengths = np.frombuffer(base64.b64decode(d["lengths"]), np.int32)
    flat = np.frombuffer(base64.b64decode(d["tokens"]), np.int32).tolist()
    out, pos = [], 0
    for n in lengths.tolist():
        out.append(flat[pos:pos + n])
        pos += n
    return out


def _encode_groups(groups: list[list[list[tuple]]]) -> dict:
    """Groups (buckets) of rows of (src, tgt) pairs -> JSON."""
    shape = [[len(row) for row in rows] for rows in groups]
    seqs = [seq for rows in groups for row in rows for pair in row for seq in pair]
    return {"shape": shape, "seqs": _encode_seqs(seqs)}


def _decode_groups(d: dict) -> list[list[list[tuple]]]:
    seqs = iter(_decode_seqs(d["seqs"]))
    return [[[(next(seqs), next(seqs)) for _ in range(n)] for n in rows] for rows in d["shape"]]


class BatchIterator:
    """Token-budget batches of similar-length pairs from a `{'src','tgt'}` stream; resumable.

    Pipeline per example: clean + tokenize (skips counted in `stats`) -> seeded shuffle
    buffer of data.shuffle_buffer pairs -> the smallest bucket that fits it (or first-fit
    packing into rows of the largest bucket with data.pack) -> a batch when a bucket holds
    B rows. With `repeat`, epochs follow each other forever (the shuffle buffer and buckets
    carry over, so no batch is ever partial); without, the stream is read once and the
    last part-filled buckets are emitted padded to B with all-PAD rows.
    """

    def __init__(self, dataset, tokenizer: Tokenizer, data_cfg, *, num_devices: int = 1, process_count: int = 1,
                 repeat: bool = True, shuffle: bool = True, seed: int = 0):
        self._ds = copy.deepcopy(dataset)  # we drive its position; other users of `dataset` are unaffected
        self._tok = tokenizer
        self.repeat, self.shuffle, self.seed = bool(repeat), bool(shuffle), int(seed)
        self.num_devices, self.process_count = int(num_devices), int(process_count)
        self.pack = bool(data_cfg.pack)
        self.lengths = sorted(int(x) for x in data_cfg.bucket_lengths)
        if not self.lengths or self.lengths[0] < 2:
            raise DataError(f"data.bucket_lengths={tuple(data_cfg.bucket_lengths)} must be lengths >= 2")
        self.max_len = min(int(data_cfg.max_len), self.lengths[-1])
        if int(data_cfg.max_len) > self.lengths[-1]:
            log.warning("data.max_len=%d exceeds the largest bucket %d; pairs longer than %d are skipped",
                        data_cfg.max_len, self.lengths[-1], self.lengths[-1])
        self.tokens_per_batch = int(data_cfg.tokens_per_batch)
        self.batch_sizes = [batch_size_for(n, self.tokens_per_batch, self.num_devices, self.process_count)
                            for n in self.lengths]
        self.buffer_size = max(1, int(data_cfg.shuffle_buffer)) if self.shuffle else 0
        # every [B, L] a batch can have: at most len(bucket_lengths) shapes, one with pack
        self.shapes = list(zip(self.batch_sizes, self.lengths))[-1 if self.pack else 0:]
        self._reset()

    # -- state

    def _reset(self) -> None:
        self.epoch = 0
        self.batches = 0              # emitted so far, over all epochs
        self._consumed = 0            # examples read from the stream in this epoch
        self._kept = 0                # ... of which kept
        self._stream: Iterator | None = None
        self._resume_from: dict | None = None   # HF dataset state to open the stream at
        self._rng = np.random.default_rng(self.seed)
        self._buffer: list[tuple[list[int], list[int]]] = []
        self._buckets: list[list[list[tuple]]] = [[] for _ in self.lengths]  # bucket -> rows -> pairs
        self._ready: list[tuple[int, list[list[tuple]]]] = []   # (bucket, rows) batches to emit
        self._finished = False
        self.stats = {reason: 0 for reason in _SKIP_REASONS}

    def state_dict(self) -> dict:
        """JSON-serializable position: load it into a fresh iterator to continue exactly here."""
        return {
            "version": _STATE_VERSION,
            "bucket_lengths": self.lengths,
            "pack": self.pack,
            "process_count": self.process_count,
            "epoch": self.epoch,
            "batches": self.batches,
            "consumed": self._consumed,
            "kept": self._kept,
            "dataset": (self._ds.state_dict() if self._stream is not None and self._consumed
                        else self._resume_from),
            "rng": self._rng.bit_generator.state,
            "buffer": _encode_groups([[[pair] for pair in self._buffer]]),
            "buckets": _encode_groups(self._buckets),
            "ready": {"buckets": [b for b, _ in self._ready],
                      "rows": _encode_groups([rows for _, rows in self._ready])},
            "finished": self._finished,
            "stats": dict(self.stats),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != _STATE_VERSION:
            raise DataError(f"data iterator state has version {state.get('version')}, expected {_STATE_VERSION}")
        for key, mine in (("bucket_lengths", self.lengths), ("pack", self.pack), ("process_count", self.process_count)):
            if state[key] != mine:
                name = key if key == "process_count" else f"data.{key}"
                raise DataError(f"cannot resume the data iterator: it was saved with {name}={state[key]}, now {mine}")
        self._reset()
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
        self._consumed, self._kept = int(state["consumed"]), int(state["kept"])
        self._resume_from = state["dataset"]
        self._rng.bit_generator.state = state["rng"]
        self._buffer = [rows[0] for rows in _decode_groups(state["buffer"])[0]]
        self._buckets = _decode_groups(state["buckets"])
        self._ready = list(zip(state["ready"]["buckets"], _decode_groups(state["ready"]["rows"])))
        self._finished = bool(state["finished"])
        self.stats.update(state["stats"])
        # If tokens_per_batch or the device count changed, B did too: re-split what is held.
        self._ready = [(b, rows[i:i + self.batch_sizes[b]]) for b, rows in self._ready
                       for i in range(0, len(rows), self.batch_sizes[b])]
        for b, rows in enumerate(self._buckets):
            size = self.batch_sizes[b]
            while len(rows) >= size and not (self.pack and len(rows) == size):
                self._ready.append((b, rows[:size]))
                del rows[:size]

    # -- iteration

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        while not self._ready:
            if self._finished:
                raise StopIteration
            self._step()
        b, rows = self._ready.pop(0)
        self.batches += 1
        return self._make_batch(rows, self.lengths[b], self.batch_sizes[b])

    def _open_stream(self) -> None:
        self._ds.load_state_dict(self._resume_from)  # None: from the start
        self._stream = iter(self._ds)

    def _step(self) -> None:
        """Read one example and move it along; at the stream's end, start the next epoch or flush."""
        if self._stream is None:
            self._open_stream()
        try:
            ex = next(self._stream)
        except StopIteration:
            self._end_epoch()
            return
        self._consumed += 1
        pair = self._prepare(ex)
        if pair is None:
            return
        self._kept += 1
        if not self.shuffle:
            self._add(pair)
        elif len(self._buffer) < self.buffer_size:
            self._buffer.append(pair)
        else:
            i = int(self._rng.integers(len(self._buffer)))
            self._buffer[i], pair = pair, self._buffer[i]
            self._add(pair)

    def _end_epoch(self) -> None:
        self.log_stats()
        if self._kept == 0:
            raise DataError(f"no usable examples in the data stream (epoch {self.epoch}, read {self._consumed}, "
                            f"skipped {self.stats}); check the files and data.max_len")
        if self.repeat:
            self.epoch += 1
            self._consumed = self._kept = 0
            self._resume_from, self._stream = None, None
            return
        while self._buffer:  # drain in random order
            i = int(self._rng.integers(len(self._buffer)))
            self._buffer[i], self._buffer[-1] = self._buffer[-1], self._buffer[i]
            self._add(self._buffer.pop())
        for b, rows in enumerate(self._buckets):
            if rows:
                self._ready.append((b, rows))
        self._buckets = [[] for _ in self.lengths]
        self._finished = True

    def _prepare(self, ex: dict) -> tuple[list[int], list[int]] | None:
        src, tgt, reason = _clean(ex["src"], ex["tgt"])
        if reason is None:
            src_ids, tgt_ids = self._tok.encode([src, tgt])
            if not src_ids or not tgt_ids:
                reason = "empty"
            elif max(len(src_ids), len(tgt_ids)) + 1 > self.max_len:
                reason = "too_long"
        if reason is not None:
            self.stats[reason] += 1
            return None
        return src_ids, tgt_ids

    def _add(self, pair: tuple[list[int], list[int]]) -> None:
        need = max(len(pair[0]), len(pair[1])) + 1
        if not self.pack:
            b = next(i for i, n in enumerate(self.lengths) if n >= need)
            rows = self._buckets[b]
            rows.append([pair])
            if len(rows) == self.batch_sizes[b]:
                self._ready.append((b, rows))
                self._buckets[b] = []
            return
        b, length = len(self.lengths) - 1, self.lengths[-1]
        rows = self._buckets[b]
        for row in rows:  # first fit
            if (sum(len(s) + 1 for s, _ in row) + len(pair[0]) + 1 <= length
                    and sum(len(t) + 1 for _, t in row) + len(pair[1]) + 1 <= length):
                row.append(pair)
                return
        if len(rows) == self.batch_sizes[b]:
            self._ready.append((b, rows))
            rows = self._buckets[b] = []
        rows.append([pair])

    def _make_batch(self, rows: list[list[tuple]], length: int, size: int) -> dict[str, np.ndarray]:
        names = ["src", "tgt_in", "tgt_out"]
        if self.pack:
            names += ["src_segments", "tgt_segments", "src_positions", "tgt_positions"]
        out = {k: np.zeros((size, length), np.int32) for k in names}
        for r, row in enumerate(rows):
            s0 = t0 = 0
            for seg, (s, t) in enumerate(row, 1):
                ns, nt = len(s) + 1, len(t) + 1
                out["src"][r, s0:s0 + ns] = s + [EOS_ID]
                out["tgt_in"][r, t0:t0 + nt] = [BOS_ID] + t
                out["tgt_out"][r, t0:t0 + nt] = t + [EOS_ID]
                if self.pack:
                    out["src_segments"][r, s0:s0 + ns] = seg
                    out["tgt_segments"][r, t0:t0 + nt] = seg
                    out["src_positions"][r, s0:s0 + ns] = np.arange(ns)
                    out["tgt_positions"][r, t0:t0 + nt] = np.arange(nt)
                s0, t0 = s0 + ns, t0 + nt
        return out

    def log_stats(self) -> None:
        log.info("data epoch %d: read %d examples, kept %d, skipped %s", self.epoch, self._consumed, self._kept,
                 self.stats)


def make_batches(config, tokenizer: Tokenizer, split: str, *, repeat: bool, shuffle: bool, num_devices: int = 1,
                 process_index: int | None = None, process_count: int | None = None) -> BatchIterator:
    """The trainer's entry point: this process's `BatchIterator` over `split`."""
    process_index, process_count = _process_info(process_index, process_count)
    ds = load_split(config.data, split, process_index=process_index, process_count=process_count)
    return BatchIterator(ds, tokenizer, config.data, num_devices=num_devices, process_count=process_count,
                         repeat=repeat, shuffle=shuffle, seed=int(config.data.seed))
