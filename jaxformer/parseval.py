"""Labeled-bracket scoring of constituency trees, as EVALB scores them with `COLLINS.prm` (what parsing
papers report, the Transformer paper's Table 4 among them).

COLLINS.prm, and what follows from it here:
- DELETE_LABEL: TOP, -NONE- and the punctuation tags , : `` '' . -- such a preterminal loses its word, such
  a bracket is not counted, and a bracket left spanning no word is dropped. Spans are word positions after
  the deletion, so where punctuation attaches does not matter. Punctuation is deleted by its gold tag (so a
  mistagged comma cannot make the two word sequences differ); -NONE- by each tree's own tag.
- DELETE_LABEL_FOR_LENGTH -NONE-: the <= 40 figure counts every other word, punctuation included.
- EQ_LABEL ADVP PRT: the two labels match each other, in brackets and in tags.
- CUTOFF_LEN 40, LABELED 1; as EVALB does, a bracket label is cut at its first '-' or '=' (NP-SBJ -> NP).
- Brackets are a multiset of (label, start, end); each matches at most one of the other side's.
- The root's label is ignored: TOP is deleted, and so is the unlabeled outer bracket of a raw `.mrg` tree
  (EVALB would count that one as a bracket labeled ""); a root such as S counts, as in EVALB.
- Sentences: a missing output (None: ill-formed, or no words) is skipped, words that differ from the gold
  ones make an error; neither enters the figures, both are counted.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Iterable

from nltk.tree import Tree

__all__ = ["DELETE_LABELS", "DELETE_FOR_LENGTH", "EQ_LABELS", "CUTOFF_LEN", "Counts", "SentenceResult", "Score",
           "sentence_result", "score_trees"]

DELETE_LABELS = frozenset({"TOP", "-NONE-", ",", ":", "``", "''", "."})
DELETE_FOR_LENGTH = frozenset({"-NONE-"})
EQ_LABELS = {"PRT": "ADVP"}  # EQ_LABEL ADVP PRT: each label to its class's name
CUTOFF_LEN = 40
_ROOT_LABELS = frozenset({"", "TOP"})


def _cut(label: str) -> str:
    """EVALB's modify_label: the label up to its first '-' or '='."""
    for i, char in enumerate(label):
        if char in "-=":
            return label[:i]
    return label


def _same(label: str) -> str:
    return EQ_LABELS.get(label, label)


def _percent(part: int, whole: int) -> float:
    """100 * part / whole, 0 where there is no whole (EVALB's convention for an empty count)."""
    return 100.0 * part / whole if whole else 0.0


@dataclasses.dataclass
class Counts:
    """Sums over sentences; the figures are percentages, as EVALB prints them."""
    sentences: int = 0          # all sentences given
    errors: int = 0             # words differ from the gold ones (or an unreadable tree)
    skipped: int = 0            # no output (ill-formed or empty)
    gold_brackets: int = 0
    test_brackets: int = 0
    matched: int = 0
    complete: int = 0           # sentences with every bracket matched both ways
    crossing: int = 0           # test brackets crossing some gold bracket
    no_crossing: int = 0
    words: int = 0              # scored words (punctuation and -NONE- deleted)
    correct_tags: int = 0

    @property
    def scored(self) -> int:
        return self.sentences - self.errors - self.skipped

    @property
    def precision(self) -> float:
        return _percent(self.matched, self.test_brackets)

    @property
    def recall(self) -> float:
        return _percent(self.matched, self.gold_brackets)

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    @property
    def complete_match(self) -> float:
        return _percent(self.complete, self.scored)

    @property
    def tagging_accuracy(self) -> float:
        return _percent(self.correct_tags, self.words)

    @property
    def average_crossing(self) -> float:
        return self.crossing / self.scored if self.scored else 0.0

    def add(self, result: SentenceResult) -> None:
        self.sentences += 1
        if result.status == "error":
            self.errors += 1
        elif result.status == "skipped":
            self.skipped += 1
        else:
            self.gold_brackets += result.gold_brackets
            self.test_brackets += result.test_brackets
            self.matched += result.matched
            self.complete += result.gold_brackets == result.test_brackets == result.matched
            self.crossing += result.crossing
            self.no_crossing += result.crossing == 0
            self.words += result.words
            self.correct_tags += result.correct_tags

    def as_dict(self) -> dict[str, float]:
        return {"sentences": self.sentences, "scored": self.scored, "errors": self.errors, "skipped": self.skipped,
                "precision": self.precision, "recall": self.recall, "f1": self.f1,
                "complete_match": self.complete_match, "tagging_accuracy": self.tagging_accuracy,
                "average_crossing": self.average_crossing}


@dataclasses.dataclass(frozen=True)
class SentenceResult:
    """One sentence's counts; `status` is "ok", "error" or "skipped", `reason` says why when not ok."""
    length: int                 # gold words other than -NONE- (what the ≤ 40 cut-off reads)
    status: str = "ok"
    reason: str = ""
    gold_brackets: int = 0
    test_brackets: int = 0
    matched: int = 0
    crossing: int = 0
    words: int = 0
    correct_tags: int = 0


@dataclasses.dataclass
class Score:
    """EVALB's summary: `all` sentences and those of at most CUTOFF_LEN words (`short`)."""
    all: Counts = dataclasses.field(default_factory=Counts)
    short: Counts = dataclasses.field(default_factory=Counts)

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {"all": self.all.as_dict(), f"len<={CUTOFF_LEN}": self.short.as_dict()}


def _spans(tree: Tree) -> tuple[list[tuple[str, str]], list[tuple[str, int, int]]]:
    """(tag, word) per word other than -NONE-, and (label, start, end) per constituent over those positions."""
    words: list[tuple[str, str]] = []
    brackets: list[tuple[str, int, int]] = []

    def walk(node: Tree, is_root: bool) -> None:
        if len(node) == 1 and isinstance(node[0], str):
            if node.label() not in DELETE_FOR_LENGTH:
                words.append((node.label(), node[0]))
            return
        if any(isinstance(child, str) for child in node):
            raise ValueError(f"constituent {node.label()!r} mixes words and constituents")
        start = len(words)
        for child in node:
            walk(child, False)
        if not (is_root and node.label() in _ROOT_LABELS):
            brackets.append((node.label(), start, len(words)))

    if isinstance(tree, Tree) and len(tree) == 1 and isinstance(tree[0], str):  # a bare preterminal
        tree = Tree("", [tree])
    walk(tree, True)
    return words, brackets


def _kept_brackets(brackets, position: list[int]) -> list[tuple[str, int, int]]:
    """EVALB's massage: spans over the kept words, empty spans and deleted labels out, labels cut and merged."""
    kept = []
    for label, start, end in brackets:
        start, end = position[start], position[end]
        label = _cut(label)
        if start != end and label not in DELETE_LABELS:
            kept.append((_same(label), start, end))
    return kept


def sentence_result(gold: Tree, test: Tree | None) -> SentenceResult:
    """One sentence's EVALB counts; `test` None (an ill-formed output) counts as skipped."""
    gold_words, gold_brackets = _spans(gold)
    length = len(gold_words)
    if test is None:
        return SentenceResult(length, "skipped", "no tree")
    try:
        test_words, test_brackets = _spans(test)
    except ValueError as e:
        return SentenceResult(length, "error", str(e))
    if not test_words:
        return SentenceResult(length, "skipped", "no words")
    if [w for _, w in gold_words] != [w for _, w in test_words]:
        return SentenceResult(length, "error", f"words differ ({len(gold_words)} gold, {len(test_words)} test)")
    keep = [tag not in DELETE_LABELS for tag, _ in gold_words]
    position = [0]
    for k in keep:
        position.append(position[-1] + k)
    gold_kept = _kept_brackets(gold_brackets, position)
    test_kept = _kept_brackets(test_brackets, position)
    matched = sum((Counter(gold_kept) & Counter(test_kept)).values())
    crossing = sum(any(gs < ts < ge < te or ts < gs < te < ge for _, gs, ge in gold_kept)
                   for _, ts, te in test_kept)
    tags = [(_same(g), _same(t)) for (g, _), (t, _), k in zip(gold_words, test_words, keep) if k]
    return SentenceResult(length, gold_brackets=len(gold_kept), test_brackets=len(test_kept), matched=matched,
                          crossing=crossing, words=len(tags), correct_tags=sum(g == t for g, t in tags))


def score_trees(gold: Iterable[Tree], test: Iterable[Tree | None]) -> Score:
    """EVALB's summary over paired gold and test trees (None for an output that is not a tree)."""
    gold, test = list(gold), list(test)
    if len(gold) != len(test):
        raise ValueError(f"{len(gold)} gold trees but {len(test)} test trees: give one output per gold sentence")
    score = Score()
    for g, t in zip(gold, test):
        result = sentence_result(g, t)
        score.all.add(result)
        if result.length <= CUTOFF_LEN:
            score.short.add(result)
    return score
