"""BLEU as the papers computed it: each score with a one-line description and its signature.

Papers do not agree on what "BLEU" is, so every score here says how it was made:
- `bleu_scores`: cased sacreBLEU of detokenized output against raw references (the headline), with the
  lowercased score beside it (`case:lc`).
- `tokenized_bleu`: output and references as they are, sacreBLEU `tokenize="none"`, which is what
  multi-bleu.perl computes: the number of papers that train and score on tokenized text (e.g. Multi30k's
  official lowercased, Moses-tokenized `*.lc.norm.tok.*` files).
- `moses_lc_bleu`: raw-text output made like those files (lowercased, punctuation-normalised,
  Moses-tokenized with escaping; `moses_lc`), scored against the tokenized references with `tokenize="none"`.
  Applied to Multi30k's raw test2016 German references, `moses_lc` reproduces all 1,000 lines of
  `test2016.lc.norm.tok.de`, so this number compares with papers that trained on those files.
- `compound_split_bleu`: the Transformer paper's WMT14 En-De number, as tensor2tensor's `get_ende_bleu.sh`
  made it: Moses-tokenized cased text with every intra-word hyphen split off (`compound_split`), then
  multi-bleu.

A signature is sacreBLEU's, followed, where the text was changed before scoring, by what was done to the
hypotheses (`hyp:`) and references (`ref:`) and the sacremoses version.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

__all__ = ["BleuResult", "corpus_bleu", "bleu_scores", "tokenized_bleu", "moses_lc", "moses_tokenize",
           "moses_lc_bleu", "compound_split", "compound_split_bleu"]


@dataclasses.dataclass
class BleuResult:
    score: float            # corpus BLEU, 0..100
    signature: str          # how it was computed: sacreBLEU's signature (+ hyp:/ref: preprocessing)
    text: str               # sacreBLEU's one-line summary ("BLEU = 27.31 59.1/33.0/... (BP = ...)")
    num_sentences: int
    hypotheses: list[str] = dataclasses.field(default_factory=list, repr=False)
    description: str = ""   # one line: what the number is and what it compares with
    name: str = ""          # its suffix in bleu.json ("": the headline `bleu`; "lowercase": `bleu_lowercase`)
    others: list["BleuResult"] = dataclasses.field(default_factory=list, repr=False)  # scores reported beside it

    @property
    def lowercased(self) -> "BleuResult | None":
        """The same corpus scored case-insensitively (`bleu_scores`), if reported."""
        return self.get("lowercase")

    def get(self, name: str) -> "BleuResult | None":
        return next((r for r in self.others if r.name == name), None)

    def all(self) -> list["BleuResult"]:
        return [self] + self.others

    def to_json(self) -> dict:
        """`bleu`, `signature`, `summary`, `description`, then `<key>_<name>` for each score beside it."""
        out = {}
        for r in self.all():
            suffix = f"_{r.name}" if r.name else ""
            out.update({f"bleu{suffix}": r.score, f"signature{suffix}": r.signature, f"summary{suffix}": r.text,
                        f"description{suffix}": r.description})
        out["num_sentences"] = self.num_sentences
        return out

    def lines(self) -> str:
        """What `jaxformer evaluate` prints and bleu.txt holds: per score, its description and summary, then
        its signature."""
        return "".join(f"{r.description + ': ' if r.description else ''}{r.text}\n{r.signature}\n" for r in self.all())


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str], *, tokenize: str | None = None,
                lowercase: bool = False, name: str = "", description: str = "", preprocessing: str = "") -> BleuResult:
    """sacreBLEU corpus BLEU of `hypotheses` against one reference each (`tokenize` default 13a);
    `preprocessing` (what was done to the text before) is appended to the signature."""
    from sacrebleu.metrics import BLEU

    hypotheses, references = list(hypotheses), list(references)
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references; they must pair up line "
                         "by line")
    kwargs = {"lowercase": lowercase}
    if tokenize is not None:
        kwargs["tokenize"] = tokenize
    if tokenize == "none":  # tokenized text on purpose: no "forgot to detokenize?" warning
        kwargs["force"] = True
    metric = BLEU(**kwargs)
    result = metric.corpus_score(hypotheses, [references])
    signature = str(metric.get_signature()) + (f"|{preprocessing}" if preprocessing else "")
    return BleuResult(float(result.score), signature, str(result), len(hypotheses), hypotheses,
                      description=description, name=name)


def bleu_scores(hypotheses: Sequence[str], references: Sequence[str], *, tokenize: str | None = None) -> BleuResult:
    """Cased sacreBLEU (the headline number), with `.lowercased` the same with lowercase=True.

    Both use one tokenizer (`tokenize`, default 13a), so the lowercased score differs only in case and is
    comparable with papers reporting lowercased BLEU (their tokenization may still differ: see its signature).
    """
    tok = tokenize or "13a"
    if tok == "none":
        what = "cased BLEU, output and references as they are (tokenize none)"
    else:
        what = "cased sacreBLEU, detokenized output vs raw references (the headline)"
    result = corpus_bleu(hypotheses, references, tokenize=tokenize, description=what)
    result.others.append(corpus_bleu(hypotheses, references, tokenize=tokenize, lowercase=True, name="lowercase",
                                     description="lowercased sacreBLEU, the same otherwise"))
    return result


def tokenized_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> BleuResult:
    """BLEU of pre-tokenized output against pre-tokenized references, both as they are: sacreBLEU
    `tokenize="none"`, i.e. multi-bleu.perl (cased; lowercased text stays lowercased)."""
    return corpus_bleu(hypotheses, references, tokenize="none", name="tokenized",
                       description="tokenized BLEU, output and references as they are (= multi-bleu.perl)")


def _sacremoses_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sacremoses")
    except PackageNotFoundError:
        return "unknown"


def moses_lc(lines: Sequence[str], lang: str) -> list[str]:
    """Raw text made like Multi30k's official `*.lc.norm.tok.*` files: lowercased, then sacremoses'
    punctuation normaliser, then the Moses tokenizer with escaping (`"` -> `&quot;`); hyphenated words stay whole.
    The order matters: cased, German `Bart.` keeps its full stop (a non-breaking prefix), and normalising
    after tokenizing rejoins `( eine` into `(eine`."""
    from sacremoses import MosesPunctNormalizer, MosesTokenizer

    normalizer, tokenizer = MosesPunctNormalizer(lang=lang), MosesTokenizer(lang=lang)
    return [tokenizer.tokenize(normalizer.normalize(line.lower()), escape=True, return_str=True) for line in lines]


def moses_tokenize(lines: Sequence[str], lang: str) -> list[str]:
    """Cased Moses tokenization with escaping, as `tokenizer.perl -l LANG` (no normalisation, no aggressive
    hyphen splitting)."""
    from sacremoses import MosesTokenizer

    tokenizer = MosesTokenizer(lang=lang)
    return [tokenizer.tokenize(line, escape=True, return_str=True) for line in lines]


def moses_lc_bleu(hypotheses: Sequence[str], tokenized_references: Sequence[str], lang: str) -> BleuResult:
    """BLEU of raw-text output, made like the references by `moses_lc`, against lowercased Moses-tokenized
    references as they are (tokenize none): comparable with tokenized BLEU of models trained on such files."""
    prepared = moses_lc(hypotheses, lang)
    result = corpus_bleu(prepared, tokenized_references, tokenize="none", name="moses_lc",
                         description="Moses-tokenized lowercased BLEU, raw output lowercased, normalised and "
                                     "Moses-tokenized vs tokenized references",
                         preprocessing=f"hyp:lc+norm+moses-tok|lang:{lang}|sacremoses:{_sacremoses_version()}")
    result.hypotheses = list(hypotheses)
    return result


_COMPOUND = re.compile(r"(\S)-(\S)")


def compound_split(line: str) -> str:
    """tensor2tensor's `perl -ple 's{(\\S)-(\\S)}{$1 ##AT##-##AT## $2}g'`: every hyphen between two
    non-spaces becomes ` ##AT##-##AT## `. Matches do not overlap, as in Perl: `a-b-c` splits only its first hyphen."""
    return _COMPOUND.sub(r"\1 ##AT##-##AT## \2", line)


def compound_split_bleu(hypotheses: Sequence[str], references: Sequence[str], lang: str, *,
                        tokenized: bool = False) -> BleuResult:
    """The Transformer paper's WMT14 En-De BLEU, as tensor2tensor's `get_ende_bleu.sh`: both sides
    Moses-tokenized (cased; skipped with `tokenized`, where they already are), compound-split, then
    multi-bleu (tokenize none)."""
    if tokenized:
        hyp, ref, prep = list(hypotheses), list(references), "hyp:atat|ref:atat"
    else:
        hyp, ref = moses_tokenize(hypotheses, lang), moses_tokenize(references, lang)
        prep = f"hyp:moses-tok+atat|ref:moses-tok+atat|lang:{lang}|sacremoses:{_sacremoses_version()}"
    result = corpus_bleu([compound_split(h) for h in hyp], [compound_split(r) for r in ref], tokenize="none",
                         name="compound_split", preprocessing=prep,
                         description="compound-split tokenized BLEU (tensor2tensor's get_ende_bleu.sh), the "
                                     "Transformer paper's WMT14 En-De number")
    result.hypotheses = list(hypotheses)
    return result
