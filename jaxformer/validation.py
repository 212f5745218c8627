"""What a validation during training decodes, and how the outputs score: the valid pairs
train.eval_bleu_sentences names; cased and lowercased sacreBLEU and exact match (with train.valid_tok_refs also
Moses-tokenized lowercased BLEU), or a parser's dev parseval F1 (`jaxformer.parsing`)."""

from __future__ import annotations

import logging
import os

import ml_collections

from jaxformer import parallel
from jaxformer.config import ALL_SENTENCES
from jaxformer.model import Transformer

log = logging.getLogger(__name__)


def evaluate_bleu(model: Transformer, params, tokenizer, pairs: list[tuple[str, str]], decode_cfg, *,
                  tokenize: str = "13a", tok_refs: list[str] | None = None,
                  lang: str = "de") -> tuple[dict, list[str]]:
    """Decode the sources of `pairs`; ({"bleu": cased sacreBLEU on the raw references, "bleu_lowercase": the
    same lowercased, "exact_match": fraction of outputs equal to their reference, and with `tok_refs` (one per
    pair) "bleu_moses_lc": `moses_lc_bleu` in Moses language `lang`}, the outputs)."""
    from jaxformer.bleu import bleu_scores, moses_lc_bleu
    from jaxformer.data import is_parser
    from jaxformer.translate import translate_texts

    if is_parser(tokenizer):  # a parser: dev parseval F1 instead (jaxformer.parsing)
        from jaxformer.parsing import validation_scores
        return validation_scores(model, parallel.to_local(params), tokenizer, pairs, decode_cfg)
    hypotheses = translate_texts(model, parallel.to_local(params), tokenizer, [s for s, _ in pairs], decode_cfg)
    references = [t for _, t in pairs]
    bleu = bleu_scores(hypotheses, references, tokenize=tokenize or None)
    exact = sum(h.strip() == r.strip() for h, r in zip(hypotheses, references)) / len(pairs)
    scores = {"bleu": bleu.score, "bleu_lowercase": bleu.lowercased.score, "exact_match": exact}
    if tok_refs is not None:
        scores["bleu_moses_lc"] = moses_lc_bleu(hypotheses, tok_refs[:len(pairs)], lang).score
    return scores, hypotheses


def bleu_pairs(config: ml_collections.ConfigDict) -> list[tuple[str, str]]:
    """The validation pairs each validation decodes: all (train.eval_bleu_sentences=-1), the first N, or none (0)."""
    from jaxformer.data import read_pairs

    n = int(config.train.eval_bleu_sentences)
    if n == 0:
        return []
    pairs = read_pairs(config.data, "valid", limit=None if n == ALL_SENTENCES else n)
    log.info("validation decodes %d pairs of the valid split (train.eval_bleu_sentences=%d)", len(pairs), n)
    return pairs


def tok_references(config: ml_collections.ConfigDict, pairs: list[tuple[str, str]]) -> list[str] | None:
    """The lines of train.valid_tok_refs for `pairs` (the first len(pairs)), or None when it is not set. The
    file must hold one line per pair of the valid split (as `read_pairs` reads it): a one-line ValueError if not."""
    from jaxformer.data import read_pairs
    from jaxformer.lines import read_lines

    path = str(config.train.get("valid_tok_refs", "") or "")
    if not path:
        return None
    if not os.path.isfile(path):
        raise ValueError(f"train.valid_tok_refs={path!r}: no such file")
    lines = read_lines(path)
    whole = int(config.train.eval_bleu_sentences) == ALL_SENTENCES
    total = len(pairs) if whole else len(read_pairs(config.data, "valid"))
    if len(lines) != total:
        raise ValueError(f"train.valid_tok_refs={path!r} has {len(lines)} lines but the valid split has {total} "
                         f"pairs (empty and undecodable ones dropped); give the tokenized references of the same split")
    return lines[:len(pairs)]
