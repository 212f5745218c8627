"""BLEU the way papers report it: detokenized hypotheses scored by sacreBLEU against raw references.

`corpus_bleu` wraps sacreBLEU and returns the score with its signature (e.g.
`nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0`), which says how the
number was computed and belongs next to it. `bleu_scores` gives that cased score and,
beside it, the lowercased one (`case:lc`) that much of the literature reports (e.g.
Multi30k papers); both go into bleu.json. `evaluate_texts` translates and scores;
`run_evaluation` is the `jaxformer evaluate` command: a run's averaged checkpoints (its
`train.average_last` by default), one checkpoint, or an export directory; a test split
of the run's data (hub or local files, read by `jaxformer.data.load_split`) or explicit
--src/--ref files; an output directory for the hypotheses and the scores.

Every line of the test set is scored, as sacreBLEU and the papers do: unlike training,
which skips pairs with an empty side or a U+FFFD (undecodable bytes), evaluation keeps
them; an empty source gets an empty translation, and the counts are logged and saved.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import time
from typing import Any, Mapping, Sequence

__all__ = ["corpus_bleu", "bleu_scores", "BleuResult", "evaluate_texts", "run_evaluation", "read_lines",
           "read_test_lines"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class BleuResult:
    score: float            # corpus BLEU, 0..100
    signature: str          # sacreBLEU's signature of how it was computed
    text: str               # sacreBLEU's one-line summary ("BLEU = 27.31 59.1/33.0/... (BP = ...)")
    num_sentences: int
    hypotheses: list[str] = dataclasses.field(default_factory=list, repr=False)
    lowercased: "BleuResult | None" = None  # the same corpus scored case-insensitively (`bleu_scores`)

    def to_json(self) -> dict:
        out = {"bleu": self.score, "signature": self.signature, "summary": self.text,
               "num_sentences": self.num_sentences}
        if self.lowercased is not None:
            out.update(bleu_lowercase=self.lowercased.score, signature_lowercase=self.lowercased.signature,
                       summary_lowercase=self.lowercased.text)
        return out

    def lines(self) -> str:
        """What `jaxformer evaluate` prints and bleu.txt holds: each score's summary, then its signature."""
        results = [self] + ([self.lowercased] if self.lowercased is not None else [])
        return "".join(f"{r.text}\n{r.signature}\n" for r in results)


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str], *, tokenize: str | None = None,
                lowercase: bool = False) -> BleuResult:
    """sacreBLEU corpus BLEU of detokenized `hypotheses` against one raw reference each."""
    from sacrebleu.metrics import BLEU

    hypotheses, references = list(hypotheses), list(references)
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references; they must pair up line "
                         "by line")
    kwargs = {"lowercase": lowercase}
    if tokenize is not None:
        kwargs["tokenize"] = tokenize
    metric = BLEU(**kwargs)
    result = metric.corpus_score(hypotheses, [references])
    return BleuResult(float(result.score), str(metric.get_signature()), str(result), len(hypotheses), hypotheses)


def bleu_scores(hypotheses: Sequence[str], references: Sequence[str], *, tokenize: str | None = None) -> BleuResult:
    """Cased sacreBLEU (the headline number), with `.lowercased` the same with lowercase=True.

    Both use one tokenizer (`tokenize`, default 13a), so the lowercased score differs only in case and is
    comparable with papers reporting lowercased BLEU (their tokenization may still differ: see its signature).
    """
    result = corpus_bleu(hypotheses, references, tokenize=tokenize)
    result.lowercased = corpus_bleu(hypotheses, references, tokenize=tokenize, lowercase=True)
    return result


def evaluate_texts(translator, sources: Sequence[str], references: Sequence[str], *, tokenize: str | None = None,
                   **decode_overrides) -> BleuResult:
    """Translate `sources` with a `Translator` and score them (cased, with the lowercased score beside it)."""
    if len(sources) != len(references):
        raise ValueError(f"{len(sources)} sources but {len(references)} references")
    hypotheses = translator.translate(list(sources), **decode_overrides)
    return bleu_scores(hypotheses, references, tokenize=tokenize)


def read_lines(path: str | os.PathLike) -> list[str]:
    """One sentence per line (trailing newline stripped, nothing else); undecodable bytes read as U+FFFD."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return [line.rstrip("\r\n") for line in f]


def read_test_lines(data_cfg, split: str, limit: int | None = None) -> tuple[list[str], list[str]]:
    """Every (stripped) source and reference line of a split, read as training reads it
    (`jaxformer.data.load_split`) but with nothing dropped: scoring must cover the whole test set."""
    from jaxformer.data import load_split

    sources, references = [], []
    for ex in load_split(data_cfg, split, process_index=0, process_count=1):
        if limit is not None and len(sources) >= limit:
            break
        sources.append((ex["src"] or "").strip())
        references.append((ex["tgt"] or "").strip())
    return sources, references


def count_bad_lines(sources: Sequence[str], references: Sequence[str]) -> dict[str, int]:
    """Lines training would skip: a blank side ("empty"), or a U+FFFD, i.e. undecodable bytes ("bad_utf8")."""
    empty = sum(not s.strip() or not r.strip() for s, r in zip(sources, references))
    bad = sum("\ufffd" in s or "\ufffd" in r for s, r in zip(sources, references))
    return {"empty": empty, "bad_utf8": bad}


def run_evaluation(model_path: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, split: str = "test",
                   src_file: str | None = None, ref_file: str | None = None, average_last: int | None = None,
                   step: int | None = None, data_overrides: Mapping[str, Any] | None = None,
                   decode_overrides: Mapping[str, Any] | None = None, limit: int | None = None,
                   tokenize: str | None = None) -> BleuResult:
    """Translate a test set and write `out_dir/{split}.hyp` (one line per source), `bleu.json` and `bleu.txt`.

    A workdir is evaluated as the average of its last `train.average_last` checkpoints unless `average_last`
    or `step` says otherwise. Every line is scored (see the module docstring). Without `tokenize`, sacreBLEU's
    tokenizer is the run's `train.bleu_tokenize` (default 13a). Without `out_dir`, the files go to
    `model_path/evaluation/<split or source file name>`."""
    from jaxformer.config import default_config
    from jaxformer.io import load

    model_path = pathlib.Path(model_path)
    translator = load(model_path, step=step, average_last=average_last)
    config = translator.config if translator.config is not None else default_config()
    if tokenize is None:
        tokenize = config.train.get("bleu_tokenize") or None
    if (src_file is None) != (ref_file is None):
        raise ValueError("give both --src and --ref, or neither (then the run's data.* config is used)")
    if src_file is not None:
        sources, references = read_lines(src_file), read_lines(ref_file)
        if len(sources) != len(references):
            raise ValueError(f"{src_file} has {len(sources)} lines but {ref_file} has {len(references)}")
        origin = f"{src_file} / {ref_file}"
        name = pathlib.Path(src_file).stem or split
    else:
        for key, value in (data_overrides or {}).items():
            config.data[key] = value
        sources, references = read_test_lines(config.data, split, limit)
        origin = f"split {split!r} of data.source={config.data.source}"
        name = split
    if limit is not None:
        sources, references = sources[:limit], references[:limit]
    if not sources:
        raise ValueError(f"no sentences to evaluate in {origin}")
    bad = count_bad_lines(sources, references)
    if any(bad.values()):
        log.warning("%s: %d of %d lines have an empty side and %d a U+FFFD (undecodable bytes); all are scored "
                    "(an empty source gets an empty translation)", origin, bad["empty"], len(sources),
                    bad["bad_utf8"])
    start = time.time()
    hypotheses = translator.translate(sources, **dict(decode_overrides or {}))
    seconds = time.time() - start
    result = bleu_scores(hypotheses, references, tokenize=tokenize)
    out = pathlib.Path(out_dir) if out_dir is not None else model_path / "evaluation" / name
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.hyp").write_text("".join(h.replace("\n", " ") + "\n" for h in hypotheses), encoding="utf-8")
    settings = dict(translator.decode)
    settings.update({k: v for k, v in (decode_overrides or {}).items() if v is not None})
    steps = translator.checkpoint_steps
    info = {**result.to_json(), "model": str(model_path), "checkpoint_steps": steps,
            "average_last": len(steps) if steps else None, "step": step, "test_set": origin,
            "empty_lines": bad["empty"], "bad_utf8_lines": bad["bad_utf8"], "decode": settings,
            "seconds": round(seconds, 2), "sentences_per_second": round(len(sources) / max(seconds, 1e-9), 2)}
    (out / "bleu.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / "bleu.txt").write_text(result.lines())
    log.info("%s (lowercased: %.2f) on %d sentences of %s%s; files in %s", result.text, result.lowercased.score,
             len(sources), origin, f", checkpoint steps {steps}" if steps else "", out)
    return result
