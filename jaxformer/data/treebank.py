"""Penn Treebank trees for the paper's parsing task (§6.3): trees in, sequences out, trees back.

- Reading: the treebank's `.mrg` files through nltk's `BracketParseCorpusReader`, a split chosen by file
  number (`wsj_NNNN.mrg`, flat or in the LDC's `wsj/SS/` section folders), or `nltk.corpus.treebank`. Each
  file is first scanned for balanced brackets, so a broken tree is reported with its file and line (nltk
  knows neither).
- Normalizing, as parsing papers do before training and scoring: `-NONE-` empty elements and the
  constituents they leave empty are dropped, function tags and indices stripped (`NP-SBJ-1` -> `NP`), the
  unlabeled outer bracket removed.
- Linearizing, as Vinyals et al. (2015) and the paper do: the source is the words; the target is the tree
  as symbols, `(NP` for an opening bracket with its label, `)` for a closing one, the POS tag for a word.
  `delinearize` puts the words back under their tags.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from nltk.corpus.reader import BracketParseCorpusReader
from nltk.tree import Tree

from jaxformer.data.common import DataError

__all__ = ["SAMPLE_SPLITS", "WSJ_SPLITS", "CLOSE", "IllFormedTree", "split_files", "tree_lines", "read_trees",
           "read_split", "read_nltk_treebank", "strip_label", "normalize", "linearize", "delinearize",
           "to_bracket"]

# Splits by file number, inclusive: `wsj_0140.mrg` is number 140. The free sample (../shared/data/ptb_sample).
SAMPLE_SPLITS = {"train": (1, 139), "dev": (140, 159), "test": (160, 179)}
# The paper's setting on the licensed WSJ: sections 02-21 / 22 / 23 (file wsj_SSNN is in section SS).
WSJ_SPLITS = {"train": (200, 2199), "dev": (2200, 2299), "test": (2300, 2399)}
CLOSE = ")"  # the closing-bracket symbol of a linearized tree
NONE_TAG = "-NONE-"
_MRG = re.compile(r"wsj_(\d{4})\.mrg", re.IGNORECASE)


class IllFormedTree(ValueError):
    """A symbol sequence that is not one well-formed tree over the given words."""


def split_files(directory: str | os.PathLike, split: str,
                splits: Mapping[str, tuple[int, int]] = SAMPLE_SPLITS) -> list[Path]:
    """The `wsj_NNNN.mrg` files under `directory` (any depth) whose number is in `splits[split]`, sorted."""
    directory = Path(directory)
    if split not in splits:
        raise DataError(f"unknown split {split!r}: choose one of {sorted(splits)}")
    if not directory.is_dir():
        raise DataError(f"{directory}: no such treebank directory; point it at the folder holding the .mrg files")
    first, last = splits[split]
    files = sorted((p for p in directory.rglob("*") if (m := _MRG.fullmatch(p.name)) and first <= int(m[1]) <= last),
                   key=lambda p: p.name.lower())
    if not files:
        raise DataError(f"{directory}: no wsj_NNNN.mrg file numbered {first:04d}-{last:04d} for split {split!r}; "
                        "check the directory and the split ranges (SAMPLE_SPLITS for the sample, WSJ_SPLITS for LDC)")
    return files


def tree_lines(path: str | os.PathLike) -> list[int]:
    """The line where each tree of a bracketed file starts; a DataError naming the file and line if a bracket
    is unbalanced or there is no tree. (nltk reports neither file nor line.) Lines that cannot bring the depth
    to zero are counted without a character scan."""
    depth, starts = 0, []
    with open(path, encoding="ascii", errors="replace") as f:
        for number, line in enumerate(f, 1):
            closes = line.count(")")
            if depth and closes < depth:  # no tree ends or starts on this line
                depth += line.count("(") - closes
                continue
            for char in line:
                if char == "(":
                    if depth == 0:
                        starts.append(number)
                    depth += 1
                elif char == ")":
                    depth -= 1
                    if depth < 0:
                        raise DataError(f"{path}:{number}: a ')' closes no bracket (unbalanced tree); fix the file")
    if depth:
        raise DataError(f"{path}:{starts[-1]}: the tree that starts here is never closed ({depth} '(' left open); "
                        "fix the file")
    if not starts:
        raise DataError(f"{path}:1: no trees in this file; remove it or give it bracketed trees")
    return starts


def _authorize(root: Path) -> None:
    """nltk >= 3.10 reads corpora only under `nltk.data.path` (PermissionError: Unauthorized path otherwise)."""
    import nltk

    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))


def read_trees(paths: Sequence[str | os.PathLike], *, normalized: bool = True) -> list[Tree]:
    """Every tree of the `.mrg` files, in order, normalized (see `normalize`) unless `normalized=False`. Adds
    their common folder to `nltk.data.path`: nltk >= 3.10 reads corpora only there."""
    paths = [Path(p).resolve() for p in paths]
    if not paths:
        return []
    root = Path(os.path.commonpath([p.parent for p in paths]))
    _authorize(root)
    reader = BracketParseCorpusReader(str(root), [str(p.relative_to(root)) for p in paths], encoding="ascii")
    trees = []
    for path in paths:
        trees.extend(_checked(path, reader, str(path.relative_to(root)), normalized))
    return trees


def _checked(path: Path, reader, fileid: str, normalized: bool) -> list[Tree]:
    """One file's trees through nltk, after the bracket scan; errors name the file and the tree's line."""
    lines = tree_lines(path)
    try:
        found = list(reader.parsed_sents(fileid))
    except ValueError as e:
        raise DataError(f"{path}:{lines[0]}: nltk cannot read this file's trees ({e}); fix the file") from None
    if len(found) != len(lines):
        raise DataError(f"{path}:1: nltk read {len(found)} trees where the brackets hold {len(lines)}; "
                        "check the file for text outside the trees")
    if not normalized:
        return found
    trees = []
    for line, tree in zip(lines, found):
        try:
            trees.append(normalize(tree))
        except DataError as e:
            raise DataError(f"{path}:{line}: {e}; remove the tree") from None
    return trees


def read_split(directory: str | os.PathLike, split: str, splits: Mapping[str, tuple[int, int]] = SAMPLE_SPLITS,
               *, normalized: bool = True) -> list[Tree]:
    """The trees of one split of a treebank directory: `read_split(dir, "train")` for the sample,
    `read_split(dir, "test", WSJ_SPLITS)` for section 23 of the LDC treebank."""
    return read_trees(split_files(directory, split, splits), normalized=normalized)


def read_nltk_treebank(split: str, splits: Mapping[str, tuple[int, int]] = SAMPLE_SPLITS, *,
                       normalized: bool = True) -> list[Tree]:
    """One split of `nltk.corpus.treebank` (the sample as `nltk.download("treebank")` installs it)."""
    import nltk.corpus

    if split not in splits:
        raise DataError(f"unknown split {split!r}: choose one of {sorted(splits)}")
    corpus = nltk.corpus.treebank
    try:
        fileids = corpus.fileids()
    except LookupError:
        raise DataError("nltk.corpus.treebank is not installed: run python -m nltk.downloader treebank, "
                        "or read a directory of .mrg files with read_split") from None
    first, last = splits[split]
    chosen = [f for f in fileids if (m := _MRG.fullmatch(os.path.basename(f))) and first <= int(m[1]) <= last]
    if not chosen:
        raise DataError(f"{corpus.root}: no wsj_NNNN.mrg file numbered {first:04d}-{last:04d} for split {split!r} "
                        "in nltk.corpus.treebank; check the split ranges")
    trees = []
    for fileid in chosen:
        trees.extend(_checked(Path(corpus.abspath(fileid)), corpus, fileid, normalized))
    return trees


def strip_label(label: str) -> str:
    """A phrase label without function tags, indices and alternatives: `NP-SBJ-1`, `NP=2`, `WHNP-1` -> `NP`,
    `NP`, `WHNP`; `ADVP|PRT` -> `ADVP` (the first). Labels that start with '-' (`-NONE-`, `-LRB-`) stay."""
    if label.startswith("-"):
        return label
    return re.split(r"[-=|]", label, maxsplit=1)[0]


def _is_preterminal(node) -> bool:
    return isinstance(node, Tree) and len(node) == 1 and isinstance(node[0], str)


def _prune(node: Tree) -> Tree | None:
    """`node` without empty elements, function tags and the constituents left empty; None if nothing is left."""
    if _is_preterminal(node):
        return None if node.label() == NONE_TAG else Tree(node.label(), [node[0]])
    children = [c for c in (_prune(child) for child in node) if c is not None]
    return Tree(strip_label(node.label()), children) if children else None


def normalize(tree: Tree) -> Tree:
    """The tree as parsers train and are scored on it: no `-NONE-` elements (nor the constituents they leave
    empty), no function tags or indices, no unlabeled outer bracket (one around several constituents is
    named `TOP`)."""
    pruned = _prune(tree)
    if pruned is None:
        raise DataError("the tree holds only -NONE- empty elements")
    while pruned.label() == "" and len(pruned) == 1 and not _is_preterminal(pruned):
        pruned = pruned[0]
    if pruned.label() == "":  # an outer bracket around several constituents: it is the root, so name it
        pruned.set_label("TOP")
    return pruned


def linearize(tree: Tree) -> tuple[list[str], list[str]]:
    """(words, symbols): the source words and the target sequence, `(LABEL` / `)` / a POS tag per word."""
    words, symbols = [], []

    def walk(node: Tree) -> None:
        if _is_preterminal(node):
            symbols.append(node.label())
            words.append(node[0])
            return
        symbols.append("(" + node.label())
        for child in node:
            walk(child)
        symbols.append(CLOSE)

    walk(tree)
    return words, symbols


def delinearize(symbols: Iterable[str], words: Sequence[str]) -> Tree:
    """The tree that `linearize` made `symbols` from, with `words` under its tags in order. Raises
    IllFormedTree (saying which symbol) unless the symbols form exactly one tree with no empty constituent
    and one tag per word."""
    stack: list[Tree] = []
    root = None
    used = 0
    for i, symbol in enumerate(symbols):
        if root is not None:
            raise IllFormedTree(f"symbol {i} ({symbol!r}) comes after the tree is complete")
        if symbol.startswith("("):
            stack.append(Tree(symbol[1:], []))
        elif symbol == CLOSE:
            if not stack:
                raise IllFormedTree(f"symbol {i} (')') closes no bracket")
            node = stack.pop()
            if not len(node):
                raise IllFormedTree(f"symbol {i} (')') closes an empty constituent ({node.label()!r})")
            if stack:
                stack[-1].append(node)
            else:
                root = node
        else:
            if not stack:
                raise IllFormedTree(f"symbol {i} (tag {symbol!r}) is outside every constituent")
            if used == len(words):
                raise IllFormedTree(f"symbol {i} (tag {symbol!r}) has no word left: only {len(words)} words")
            stack[-1].append(Tree(symbol, [words[used]]))
            used += 1
    if stack:
        raise IllFormedTree(f"{len(stack)} bracket(s) left open at the end")
    if root is None:
        raise IllFormedTree("no tree: the sequence has no complete constituent")
    if used != len(words):
        raise IllFormedTree(f"{len(words) - used} of {len(words)} words have no tag")
    return root


def to_bracket(tree: Tree, root: str = "TOP") -> str:
    """One line, `(TOP (S ...))`: the format EVALB and SuPar read (no root added when `root` is empty)."""
    line = tree.pformat(margin=10**9)
    return f"({root} {line})" if root else line
