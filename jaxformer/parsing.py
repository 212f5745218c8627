"""Parsing with a trained parser: words in, trees out (`jaxformer parse`, the paper's §6.3).

Raw text is tokenized as the treebank is (nltk's `TreebankWordTokenizer`, brackets as `-LRB-` ...); the
words are the source, one vocabulary entry each; the search keeps to the grammar mask (`jaxformer.grammar`),
so its output is one tree with a tag per word, and `delinearize` puts the words back under their tags.

Without the mask (`grammar=False`, for comparison) an ill-formed output is repaired by one fixed rule,
`repair`: symbols that are not tree symbols are dropped; a `)` that closes nothing, would leave its
constituent empty, or would close the root while words still lack tags is dropped; a tag with no word left
is dropped; whatever follows the complete tree is dropped; then each word still without a tag gets `NN`
(the treebank's most frequent tag) in the innermost open constituent, every open bracket is closed, and
constituents left empty are removed. A sequence with no opening bracket at all is rooted in `(S`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

from nltk.tree import Tree

from jaxformer.data import is_parser
from jaxformer.data.treebank import CLOSE, IllFormedTree, delinearize, to_bracket
from jaxformer.translate import search_ids

__all__ = ["ParseError", "Parse", "tokenize", "word_limit", "parse_words", "repair", "format_parses", "parse_lines",
           "gold_trees", "validation_scores"]

FILL_TAG = "NN"  # the tag `repair` gives a word the output left untagged
FILL_ROOT = "S"  # the root `repair` opens when the output opened none


class ParseError(ValueError):
    """A model or an input that cannot be parsed, in one line saying why and what to do."""


@dataclasses.dataclass
class Parse:
    """One sentence's parse: its words, the searched symbols, the tree (None for no words) and whether the
    symbols had to be repaired into it."""

    words: list[str]
    symbols: list[str]
    tree: Tree | None
    repaired: bool = False


def tokenize(text: str) -> list[str]:
    """The treebank's tokens of a raw sentence: `"Don't (see)."` -> `Do n't -LRB- see -RRB- .`."""
    from nltk.tokenize import TreebankWordTokenizer

    return TreebankWordTokenizer().tokenize(text, convert_parentheses=True)


def _vocabulary(translator):
    vocab = translator.tokenizer
    if not is_parser(vocab):
        raise ParseError(f"{translator.source or 'the model'} is not a parser: its vocabulary is "
                         f"{getattr(vocab, 'kind', 'unknown')!r}, parsing needs a 'words' vocabulary (train one "
                         f"with configs/ptb_parse.py)")
    return vocab


def word_limit(translator) -> int:
    """The most words a sentence may have: its flattest tree (a tag per word, the root's two brackets, EOS)
    must fit the model's `max_len` positions."""
    return int(translator.model.config.max_len) - 3


def parse_words(translator, sentences: Sequence[Sequence[str]], *, grammar: bool = True, origin: str = "",
                first: int = 0, **overrides) -> list[Parse]:
    """Parse each sentence (a list of words) with the translator's decode settings (`overrides`: beam_size,
    length_penalty, ...). With `grammar` every search output is a tree; without it ill-formed outputs are
    repaired (`repair`) and marked. A sentence over `word_limit` is a ParseError naming it ("sentence N", or
    "ORIGIN:LINE" with the line `first` + N) and the limit."""
    vocab = _vocabulary(translator)
    limit = word_limit(translator)
    for i, words in enumerate(sentences):
        where = f"{origin}:{first + i + 1}" if origin else f"sentence {i + 1}"
        if len(words) > limit:
            raise ParseError(f"{where}: {len(words)} words, more than this model's limit of {limit} "
                             f"(model.max_len={translator.model.config.max_len} - 3); split the sentence")
        if any(not w or any(c.isspace() for c in w) for w in words):
            raise ParseError(f"{where}: a word is empty or holds whitespace; give words as tokens")
    kinds = vocab.grammar_kinds() if grammar else None
    ids = vocab.encode([" ".join(words) for words in sentences])
    found = search_ids(translator.model, translator.params, ids, translator.decode, grammar=kinds, **overrides)
    symbol_set = {vocab.id_to_piece(i) for i in vocab.targets}
    parses = []
    for words, hyps in zip(sentences, found):
        words = list(words)
        symbols = [vocab.id_to_piece(t) for t in hyps[0]["tokens"]] if hyps else []
        if not words:
            parses.append(Parse(words, symbols, None))
            continue
        try:
            parses.append(Parse(words, symbols, delinearize(symbols, words)))
        except IllFormedTree:
            fixed = repair([s for s in symbols if s in symbol_set], len(words))
            parses.append(Parse(words, symbols, delinearize(fixed, words), repaired=True))
    return parses


def repair(symbols: Sequence[str], words: int) -> list[str]:
    """The symbols made into one well-formed tree over `words` words by the module docstring's rule."""
    stack: list[list] = []  # open constituents: [label, children]; a child is a constituent or a tag string
    root = None
    left = int(words)
    for symbol in symbols:
        if root is not None:
            break  # the tree is complete: the rest is dropped
        if symbol.startswith("("):
            stack.append([symbol[1:], []])
        elif symbol == CLOSE:
            if not stack or not stack[-1][1] or (len(stack) == 1 and left > 0):
                continue  # closes nothing, would leave an empty constituent, or would end the root too soon
            node = stack.pop()
            if stack:
                stack[-1][1].append(node)
            else:
                root = node
        elif stack and left > 0:
            stack[-1][1].append(symbol)
            left -= 1
    if root is None:
        if not stack:
            stack.append([FILL_ROOT, []])
        stack[-1][1].extend([FILL_TAG] * left)
        while len(stack) > 1:
            node = stack.pop()
            if node[1]:
                stack[-1][1].append(node)
        root = stack[0]

    def emit(node, out: list[str]) -> list[str]:
        if isinstance(node, str):
            out.append(node)
            return out
        out.append("(" + node[0])
        for child in node[1]:
            emit(child, out)
        out.append(CLOSE)
        return out

    return emit(root, [])


def format_parses(lines: Sequence[str], parses: Sequence[Parse], fmt: str = "bracket", draw: bool = False) -> str:
    """The text `jaxformer parse` writes: per sentence one `(TOP ...)` line (empty for no words), followed by
    nltk's text drawing with `draw`; or (jsonl) one {"sentence", "words", "tree", "symbols", "repaired"}
    record per line."""
    out = []
    for line, parse in zip(lines, parses):
        bracket = to_bracket(parse.tree) if parse.tree is not None else ""
        if fmt == "jsonl":
            out.append(json.dumps({"sentence": line, "words": parse.words, "tree": bracket,
                                   "symbols": parse.symbols, "repaired": parse.repaired}, ensure_ascii=False) + "\n")
            continue
        out.append(bracket + "\n")
        if draw and parse.tree is not None:
            out.append(_drawing(parse.tree))
    return "".join(out)


def parse_lines(translator, path: str = "-", output: str | None = None, *, fmt: str = "bracket",
                draw: bool = False, pretokenized: bool = False, grammar: bool = True, quiet: bool = False,
                **overrides) -> dict:
    """`jaxformer parse`: the lines of `path` ("-": stdin, answered line by line as `translate` does) parsed
    to `output` (None or "-": stdout), in input order. Returns {"sentences", "repaired"}; the repaired
    count is also said on stderr."""
    import contextlib
    import sys

    from jaxformer.lines import input_batches

    if draw and fmt == "jsonl":
        raise ParseError("--draw writes text drawings beside bracketed trees: use it with --format bracket")
    _vocabulary(translator)  # not a parser: one line before reading any input
    batch_size = int(overrides.get("batch_size") or translator.decode["batch_size"])
    counts = {"sentences": 0, "repaired": 0}
    with contextlib.ExitStack() as stack:
        sink = sys.stdout if output in (None, "-") else stack.enter_context(open(output, "w", encoding="utf-8"))
        batches, progress = input_batches(stack, path, batch_size, quiet)
        for lines in batches:
            sentences = [line.split() if pretokenized else tokenize(line) for line in lines]
            parses = parse_words(translator, sentences, grammar=grammar, origin="stdin" if path == "-" else path,
                                 first=counts["sentences"], **overrides)
            sink.write(format_parses(lines, parses, fmt, draw))
            sink.flush()
            counts["sentences"] += len(lines)
            counts["repaired"] += sum(p.repaired for p in parses)
            progress.update(len(lines))
    if counts["repaired"]:
        print(f"parse: {counts['repaired']} of {counts['sentences']} outputs were not well-formed trees and were "
              f"repaired (jaxformer.parsing.repair){'' if not grammar else ' (cut off at the length limit)'}",
              file=sys.stderr)
    return counts


def validation_scores(model, params, tokenizer, pairs: Sequence[tuple[str, str]], decode_cfg) -> tuple[dict, list]:
    """A parser's validation during training, on (words, linearized gold tree) pairs: ({"f1" (parseval, all
    sentences), "f1_40" (<= 40 words), "tagging_accuracy", "exact_match" (a fraction), "ill_formed"}, the
    parsed trees as brackets). Sentences over `word_limit` are left out. The search is greedy whatever the
    decode settings: an early model's trees run to the length limit, which at the paper's beam 21 made 32 dev
    sentences take 6.5 minutes on 2 CPU cores (greedy: 30 s); `jaxformer evaluate` uses the settings' beam."""
    from jaxformer.parseval import score_trees
    from jaxformer.translate import Translator

    translator = Translator(model, params, tokenizer, decode=decode_cfg)
    pairs = [(s, t) for s, t in pairs if len(s.split()) <= word_limit(translator)]
    words, gold = gold_trees([s for s, _ in pairs], [t for _, t in pairs], "the validation split")
    parses = parse_words(translator, words, beam_size=1)
    score = score_trees(gold, [p.tree for p in parses])
    return ({"f1": score.all.f1, "f1_40": score.short.f1, "tagging_accuracy": score.all.tagging_accuracy,
             "exact_match": score.all.complete_match / 100, "ill_formed": sum(p.repaired for p in parses)},
            [to_bracket(p.tree) for p in parses])


def gold_trees(sources: Sequence[str], references: Sequence[str], origin: str) -> tuple[list, list]:
    """(the words of each source line, the gold tree of each linearized reference line, as the treebank source
    writes them); one line naming a bad reference."""
    words, gold = [s.split() for s in sources], []
    for line, (symbols, sentence) in enumerate(zip(references, words), 1):
        try:
            gold.append(delinearize(symbols.split(), sentence))
        except IllFormedTree as e:
            raise ParseError(f"{origin}, line {line}: the reference is not a linearized tree over its words ({e}); "
                             f"evaluate a parser on a treebank split (data.source=treebank)") from None
    return words, gold


def _drawing(tree: Tree) -> str:
    import io

    buffer = io.StringIO()
    tree.pretty_print(stream=buffer)
    return buffer.getvalue()
