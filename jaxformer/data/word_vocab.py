"""A word-level vocabulary for parsing: one id per whitespace token, never split.

The parsing search gives each source token one part-of-speech tag (`jaxformer.grammar`), so the source must
be one token per word; and every target symbol (`(NP`, `)`, a tag) is one entry. Ids: the specials PAD 0,
UNK 1, BOS 2, EOS 3, then the target symbols (sorted), then the source words (most frequent first). A source
word seen fewer than `min_count` times in training is UNK, so the model learns an UNK embedding for the
rare words of dev and test. Words and symbols share one namespace (and the model one embedding): a word
spelled like a symbol gets the symbol's id, which only the target side gives a grammar kind.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np

from jaxformer.data.common import EOS_ID, UNK_ID, DataError, output_ids

__all__ = ["KIND", "FILENAME", "WordVocab", "is_parser"]

KIND = "words"
FILENAME = "vocab.words.json"  # the file a WordVocab is kept as, in a run workdir or an export
SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")  # ids 0-3, as jaxformer.data.common


def is_parser(tokenizer) -> bool:
    """Whether `tokenizer` is a word vocabulary (`kind` "words"), i.e. its model is a parser."""
    return getattr(tokenizer, "kind", None) == KIND


class WordVocab:
    """`jaxformer.data.Tokenizer`'s interface over whole words: `pieces[i]` is id i's word or symbol;
    `targets` are the ids of the target symbols (what `grammar_kinds` classifies)."""

    kind = KIND

    def __init__(self, pieces: Sequence[str], targets: Iterable[int], *, min_count: int = 1,
                 path: str | None = None):
        pieces = [str(p) for p in pieces]
        where = path or "<word vocabulary>"
        if tuple(pieces[:4]) != SPECIALS:
            raise DataError(f"{where}: the first four entries must be {list(SPECIALS)}, got {pieces[:4]}")
        self._ids = {p: i for i, p in enumerate(pieces)}
        if len(self._ids) != len(pieces):
            raise DataError(f"{where}: an entry is listed twice; each word or symbol needs one id")
        if any(not p or any(c.isspace() for c in p) for p in pieces):
            raise DataError(f"{where}: an entry is empty or holds whitespace; entries are whole tokens")
        self._pieces = pieces
        self.targets = sorted({int(i) for i in targets})
        if self.targets and not (4 <= self.targets[0] and self.targets[-1] < len(pieces)):
            raise DataError(f"{where}: target symbol ids must be in [4, {len(pieces)})")
        self.min_count = int(min_count)
        self.path = path

    @classmethod
    def build(cls, pairs: Iterable[tuple[str, str]], *, min_count: int = 1, path: str | None = None) -> "WordVocab":
        """From training (source, target) texts: every target symbol, and the source words seen at least
        `min_count` times; saved at `path` if given."""
        words: collections.Counter = collections.Counter()
        symbols: set[str] = set()
        n = 0
        for source, target in pairs:
            words.update(source.split())
            symbols.update(target.split())
            n += 1
        if n == 0:
            raise DataError(f"no training pairs to build the word vocabulary {path or ''} from")
        symbols -= set(SPECIALS)
        kept = sorted((w for w, c in words.items() if c >= int(min_count) and w not in symbols and w not in SPECIALS),
                      key=lambda w: (-words[w], w))
        pieces = list(SPECIALS) + sorted(symbols) + kept
        vocab = cls(pieces, range(4, 4 + len(symbols)), min_count=min_count, path=path)
        if path:
            vocab.save(path)
        return vocab

    @classmethod
    def load(cls, path: str) -> "WordVocab":
        if not os.path.isfile(path):
            raise DataError(f"missing word vocabulary {path}")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path} is not readable JSON ({e}); it is not a word vocabulary") from None
        kind = data.get("kind") if isinstance(data, dict) else None
        if kind != KIND:
            raise DataError(f"{path}: not a word vocabulary (kind {kind!r}); give a file from WordVocab.save")
        return cls(data["pieces"], data["targets"], min_count=data.get("min_count", 1), path=path)

    def save(self, path: str) -> None:
        """Write the vocabulary atomically, so a reader never sees half a file."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self._json())
        os.replace(tmp, path)
        self.path = path

    def _json(self) -> str:
        return json.dumps({"kind": KIND, "min_count": self.min_count, "targets": self.targets,
                           "pieces": self._pieces}, ensure_ascii=False, indent=0)

    @property
    def serialized(self) -> bytes:
        """Everything the ids depend on (the token cache is keyed by its hash)."""
        return b"words-vocab:" + hashlib.sha256(self._json().encode("utf-8")).hexdigest().encode()

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    def encode(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        """The id of each whitespace token (UNK for a word not kept); no BOS/EOS added."""
        del num_threads  # a dictionary lookup: no threads needed
        if isinstance(texts, str):
            raise TypeError("WordVocab.encode takes a list of strings")
        ids = self._ids
        return [[ids.get(w, UNK_ID) for w in text.split()] for text in texts]

    def encode_target(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        """Ids of linearized trees: one per symbol, UNK for a symbol training never saw."""
        return self.encode(texts, num_threads)

    def decode(self, ids) -> list[str]:
        """The tokens of each id sequence joined by spaces: stops at EOS, ignores PAD and BOS."""
        return [" ".join(self._pieces[i] for i in output_ids(seq)) for seq in ids]

    def id_to_piece(self, i: int) -> str:
        return self._pieces[int(i)]

    def piece_to_id(self, piece: str) -> int:
        return self._ids.get(piece, UNK_ID)

    def grammar_kinds(self) -> np.ndarray:
        """[V] int32 token kinds for `jaxformer.grammar` (the mask in every search): the target symbols
        `(LABEL` open, `)` closes, the others are tags; EOS ends."""
        from jaxformer import grammar

        if not self.targets:
            raise DataError(f"{self.path or 'the word vocabulary'} has no target symbols: it was not built from "
                            "linearized trees, so it cannot parse")
        opens = [i for i in self.targets if self._pieces[i].startswith("(")]
        closes = [i for i in self.targets if self._pieces[i] == ")"]
        if not closes:
            raise DataError(f"{self.path or 'the word vocabulary'} has no ')' symbol: its targets are not "
                            "linearized trees")
        tags = [i for i in self.targets if i not in set(opens) | set(closes)]
        return grammar.kinds_table(self.vocab_size, opens, closes[0], tags, EOS_ID)
