"""A Marian / opus-mt vocabulary in jaxformer's ids: two sentencepiece models and a vocab.json.

Marian segments the source with `source.spm` and the target with `target.spm`, but takes its ids from
`vocab.json` (a piece its vocab.json lacks is `<unk>`); EOS is appended, there is no BOS, and the decoder
starts from `<pad>`. `MarianVocab` tokenizes exactly as `transformers.MarianTokenizer` does (the special
tokens written in a text are split off as such, a leading `>>xx<<` language code is one piece, each
remaining chunk is segmented by sentencepiece) and hands out jaxformer's ids, so search, loss and
batching keep PAD 0, UNK 1, BOS 2, EOS 3.

`IdMap` is the one mapping between the two id spaces, used by import and export alike. For a Marian
vocabulary of V' ids: Marian's EOS -> 3, UNK -> 1, pad (the decoder start) -> 2 (BOS), every other id, in
order -> 4, 5, ...; jaxformer's PAD 0 is an extra id with no Marian counterpart (its embedding row is zero,
it is never generated and never attended), so jaxformer's vocabulary has V' + 1 ids. Permuting embedding
rows and logit biases by this map is exact.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Mapping, Sequence

import numpy as np

from jaxformer.data.common import BOS_ID, EOS_ID, PAD_ID, UNK_ID, DataError, output_ids

__all__ = ["IdMap", "MarianVocab", "DIRNAME", "KIND"]

KIND = "marian"
DIRNAME = "marian_vocab"  # the folder a MarianVocab is saved as (in a run workdir or an export)
SOURCE_SPM, TARGET_SPM, VOCAB_JSON, SETTINGS = "source.spm", "target.spm", "vocab.json", "marian_vocab.json"
SPIECE_UNDERLINE = "\u2581"


class IdMap:
    """Marian ids <-> jaxformer ids for a Marian vocabulary of `size` ids with the given special ids."""

    def __init__(self, size: int, *, eos: int, unk: int, pad: int):
        size, specials = int(size), {int(eos): EOS_ID, int(unk): UNK_ID, int(pad): BOS_ID}
        if len(specials) != 3 or not all(0 <= m < size for m in specials):
            raise DataError(f"Marian special ids eos={eos}, unk={unk}, pad={pad} must be distinct ids below the "
                            f"vocabulary size {size}")
        self.marian_size, self.eos, self.unk, self.pad = size, int(eos), int(unk), int(pad)
        to_ours = np.empty(size, np.int64)
        others = np.array([m for m in range(size) if m not in specials], np.int64)
        to_ours[others] = np.arange(4, 4 + len(others))
        for m, ours in specials.items():
            to_ours[m] = ours
        self.to_ours = to_ours                              # [V'] jaxformer id of each Marian id
        self.to_marian = np.full(size + 1, -1, np.int64)    # [V'+1] Marian id of each jaxformer id; PAD -> -1
        self.to_marian[to_ours] = np.arange(size)

    @property
    def size(self) -> int:
        """jaxformer's vocabulary size, V' + 1."""
        return self.marian_size + 1

    def rows_to_ours(self, rows: np.ndarray, pad_value: float = 0.0) -> np.ndarray:
        """Marian-indexed rows [V', ...] (an embedding, a logit bias) -> jaxformer's [V'+1, ...]; PAD's row is
        `pad_value`."""
        rows = np.asarray(rows)
        if rows.shape[0] != self.marian_size:
            raise DataError(f"{rows.shape[0]} rows, expected the vocabulary's {self.marian_size}")
        out = np.full((self.size,) + rows.shape[1:], pad_value, rows.dtype)
        out[self.to_ours] = rows
        return out

    def rows_to_marian(self, rows: np.ndarray) -> np.ndarray:
        """jaxformer-indexed rows [V'+1, ...] -> Marian's [V', ...] (PAD's row is dropped)."""
        rows = np.asarray(rows)
        if rows.shape[0] != self.size:
            raise DataError(f"{rows.shape[0]} rows, expected the vocabulary's {self.size}")
        return rows[self.to_ours]

    def ids_to_marian(self, ids: Sequence[int]) -> list[int]:
        return [int(self.to_marian[int(i)]) for i in ids]


class MarianVocab:
    """`jaxformer.data.Tokenizer`'s interface over a Marian vocabulary (see the module docstring).

    encode(texts) / encode_target(texts): ids without EOS (batching and search add it), segmented by
    source.spm / target.spm. decode(ids): as `MarianTokenizer.decode(..., skip_special_tokens=True)`
    (stops at EOS; special tokens, `<unk>` among them, are left out; pieces joined by target.spm).
    """

    kind = KIND

    def __init__(self, source_spm: bytes, target_spm: bytes, vocab: Mapping[str, int], *, eos_token: str = "</s>",
                 unk_token: str = "<unk>", pad_token: str = "<pad>", extra_special_tokens: Sequence[str] = (),
                 path: str | None = None):
        import sentencepiece as spm

        where = path or "<marian vocabulary>"
        self._source_proto, self._target_proto = bytes(source_spm), bytes(target_spm)
        try:
            self._source = spm.SentencePieceProcessor(model_proto=self._source_proto)
            self._target = spm.SentencePieceProcessor(model_proto=self._target_proto)
        except (RuntimeError, OSError) as e:
            raise DataError(f"{where}: source.spm / target.spm is not a sentencepiece model ({e})") from e
        self._vocab = {str(k): int(v) for k, v in vocab.items()}
        ids = sorted(self._vocab.values())
        if ids != list(range(len(ids))):
            raise DataError(f"{where}: {VOCAB_JSON} must give every piece a distinct id 0..{len(ids) - 1}; its ids "
                            f"have gaps or repeats (separate source/target vocabularies are not supported)")
        self.eos_token, self.unk_token, self.pad_token = str(eos_token), str(unk_token), str(pad_token)
        self.extra_special_tokens = tuple(str(t) for t in extra_special_tokens)
        specials = (self.eos_token, self.unk_token, self.pad_token) + self.extra_special_tokens
        missing = [t for t in specials if t not in self._vocab]
        if missing:
            raise DataError(f"{where}: the special token(s) {missing} are not in {VOCAB_JSON}")
        self.ids = IdMap(len(ids), eos=self._vocab[self.eos_token], unk=self._vocab[self.unk_token],
                         pad=self._vocab[self.pad_token])
        self._pieces = [""] * len(ids)
        for piece, i in self._vocab.items():
            self._pieces[i] = piece
        self._special_set = set(specials)
        self._special_marian = {self._vocab[t] for t in specials}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in sorted(set(specials), key=len, reverse=True))
                                 + ")")
        self.path = path

    # -- construction

    @classmethod
    def from_sentencepiece(cls, tokenizer) -> "MarianVocab":
        """The Marian form of a jaxformer `Tokenizer` (one shared sentencepiece model with PAD/UNK/BOS/EOS =
        0/1/2/3): vocab.json is `</s>` 0, `<unk>` 1, the pieces 4.. as 2.., `<pad>` last, so its `IdMap` gives
        back the tokenizer's own ids."""
        n = tokenizer.vocab_size
        vocab = {"</s>": 0, "<unk>": 1}
        for i in range(4, n):
            piece = tokenizer.id_to_piece(i)
            if piece in vocab or piece == "<pad>":
                raise DataError(f"piece {i} of {tokenizer.path or 'the vocabulary'} is {piece!r}, which Marian's "
                                f"vocab.json already holds")
            vocab[piece] = i - 2
        vocab["<pad>"] = n - 2
        proto = tokenizer.serialized
        return cls(proto, proto, vocab, path=tokenizer.path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MarianVocab":
        """From a folder written by `save` (source.spm, target.spm, vocab.json, marian_vocab.json)."""
        path = str(path)
        files = [os.path.join(path, f) for f in (SOURCE_SPM, TARGET_SPM, VOCAB_JSON, SETTINGS)]
        for f in files:
            if not os.path.isfile(f):
                raise DataError(f"{f} is missing: {path} is not a complete Marian vocabulary")
        settings = _read_json(files[3])
        if settings.get("kind") != KIND:
            raise DataError(f"{files[3]} is not a Marian vocabulary description (kind {settings.get('kind')!r})")
        with open(files[0], "rb") as f:
            source = f.read()
        with open(files[1], "rb") as f:
            target = f.read()
        return cls(source, target, _read_json(files[2]), eos_token=settings["eos_token"],
                   unk_token=settings["unk_token"], pad_token=settings["pad_token"],
                   extra_special_tokens=settings.get("extra_special_tokens", ()), path=path)

    def save(self, path: str | os.PathLike) -> None:
        """Write the folder `path` (replacing one written before) via a temporary folder and a rename."""
        path = os.path.abspath(str(path))
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp{uuid.uuid4().hex[:8]}")
        os.makedirs(tmp)
        try:
            self.write_files(tmp)
            with open(os.path.join(tmp, SETTINGS), "w", encoding="utf-8") as f:
                json.dump(self.settings(), f, indent=1)
            if os.path.exists(path):
                old = f"{tmp}.old"
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.path = path

    def write_files(self, directory: str | os.PathLike) -> None:
        """source.spm, target.spm and vocab.json into `directory`: the files `MarianTokenizer` reads."""
        directory = str(directory)
        for name, proto in ((SOURCE_SPM, self._source_proto), (TARGET_SPM, self._target_proto)):
            with open(os.path.join(directory, name), "wb") as f:
                f.write(proto)
        with open(os.path.join(directory, VOCAB_JSON), "w", encoding="utf-8") as f:
            json.dump(self._vocab, f, ensure_ascii=False, indent=1)

    def settings(self) -> dict:
        return {"kind": KIND, "eos_token": self.eos_token, "unk_token": self.unk_token, "pad_token": self.pad_token,
                "extra_special_tokens": list(self.extra_special_tokens)}

    # -- the Tokenizer interface

    @property
    def serialized(self) -> bytes:
        """Everything the ids depend on, as bytes (the token cache is keyed by its hash)."""
        digest = hashlib.sha256()
        for part in (json.dumps(self.settings(), sort_keys=True).encode(), self._source_proto, self._target_proto,
                     json.dumps(self._vocab, sort_keys=True, ensure_ascii=False).encode()):
            digest.update(len(part).to_bytes(8, "little") + part)
        return b"marian-vocab:" + digest.hexdigest().encode()

    @property
    def vocab_size(self) -> int:
        return self.ids.size

    @property
    def marian_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    def encode(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        """jaxformer ids of each source text (segmented by source.spm); no EOS."""
        return self._encode(texts, self._source, num_threads)

    def encode_target(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        """jaxformer ids of each target text (segmented by target.spm); no EOS."""
        return self._encode(texts, self._target, num_threads)

    def marian_pieces(self, texts: Sequence[str], *, target: bool = False) -> list[list[str]]:
        """The pieces `MarianTokenizer.tokenize` gives each text."""
        if isinstance(texts, str):
            raise TypeError("MarianVocab takes a list of strings")
        sp = self._target if target else self._source
        chunks: list[tuple[int, str, bool]] = []  # (text index, chunk, is a special token or language code)
        for n, text in enumerate(texts):
            for chunk in self._split.split(text):
                if not chunk:
                    continue
                if chunk in self._special_set:
                    chunks.append((n, chunk, True))
                    continue
                if chunk.startswith(">>") and (end := chunk.find("<<")) != -1:  # MarianTokenizer.remove_language_code
                    chunks.append((n, chunk[:end + 2], True))
                    chunk = chunk[end + 2:]
                chunks.append((n, chunk, False))
        plain = [c for _, c, special in chunks if not special]
        segmented = iter(sp.encode(plain, out_type=str) if plain else [])
        out: list[list[str]] = [[] for _ in texts]
        for n, chunk, special in chunks:
            out[n].extend([chunk] if special else next(segmented))
        return out

    def _encode(self, texts, sp, num_threads) -> list[list[int]]:
        del num_threads  # sentencepiece's batch call, without its threads: the lookup below dominates
        pieces = self.marian_pieces(list(texts) if not isinstance(texts, str) else texts, target=sp is self._target)
        unk, to_ours, vocab = self._vocab[self.unk_token], self.ids.to_ours, self._vocab
        return [[int(to_ours[vocab.get(p, unk)]) for p in seq] for seq in pieces]

    def decode(self, ids) -> list[str]:
        """Text of each id sequence: stops at EOS, leaves out PAD, BOS and Marian's special tokens (as
        `MarianTokenizer.decode(..., skip_special_tokens=True)` does, `<unk>` included)."""
        out = []
        to_marian = self.ids.to_marian
        for seq in ids:
            pieces = [self._pieces[to_marian[i]] for i in output_ids(seq) if to_marian[i] not in self._special_marian]
            text = self._target.decode_pieces(pieces) if pieces else ""
            out.append(text.replace(SPIECE_UNDERLINE, " ").strip())
        return out

    def id_to_piece(self, i: int) -> str:
        i = int(i)
        if i == PAD_ID:
            return self.pad_token
        return self._pieces[self.ids.to_marian[i]]

    def marian_ids(self, ids: Sequence[int]) -> list[int]:
        """Marian's ids of jaxformer ids (PAD has none: -1)."""
        return self.ids.ids_to_marian(ids)

    @property
    def source_proto(self) -> bytes:
        return self._source_proto

    @property
    def target_proto(self) -> bytes:
        return self._target_proto


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not readable JSON: {e}") from e
