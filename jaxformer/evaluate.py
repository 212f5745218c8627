"""BLEU the way papers report it: detokenized hypotheses scored by sacreBLEU against raw references.

`corpus_bleu` wraps sacreBLEU and returns the score with its signature (e.g.
`nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0`), which says how the
number was computed and belongs next to it. `evaluate_texts` translates and scores;
`run_evaluation` is the `jaxformer evaluate` command: a checkpoint (or the average of
the last K) or an export directory, a test split of the run's data (hub or local
files, through `jaxformer.data.read_pairs`) or explicit --src/--ref files, and an
output directory for the hypotheses and the score.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import time
from typing import Any, Mapping, Sequence

__all__ = ["corpus_bleu", "BleuResult", "evaluate_texts", "run_evaluation", "read_lines"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class BleuResult:
    score: float            # corpus BLEU, 0..100
    signature: str          # sacreBLEU's signature of how it was computed
    text: str               # sacreBLEU's one-line summary ("BLEU = 27.31 59.1/33.0/... (BP = ...)")
    num_sentences: int
    hypotheses: list[str] = dataclasses.field(default_factory=list, repr=False)

    def to_json(self) -> dict:
        return {"bleu": self.score, "signature": self.signature, "summary": self.text,
                "num_sentences": self.num_sentences}


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


def evaluate_texts(translator, sources: Sequence[str], references: Sequence[str], *, tokenize: str | None = None,
                   **decode_overrides) -> BleuResult:
    """Translate `sources` with a Translator (or (model, params, tokenizer) triple, or path) and score them."""
    from jaxformer.translate import _as_translator

    if len(sources) != len(references):
        raise ValueError(f"{len(sources)} sources but {len(references)} references")
    hypotheses = _as_translator(translator).translate(list(sources), **decode_overrides)
    return corpus_bleu(hypotheses, references, tokenize=tokenize)


def read_lines(path: str | os.PathLike) -> list[str]:
    """One sentence per line (trailing newline stripped, nothing else)."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\r\n") for line in f]


def _run_config(model_path: pathlib.Path):
    """The config to find the test set and BLEU tokenizer with: the run's (workdir), or what an export kept."""
    from jaxformer import export
    from jaxformer.config import default_config

    if not export.is_export_dir(model_path):
        from jaxformer import checkpoint
        return checkpoint.load_run_config(model_path)
    config = default_config()
    meta = export.load_export_config(model_path)
    for key, value in (meta.get("data") or {}).items():
        if key in config.data:
            config.data[key] = tuple(value) if isinstance(config.data[key], tuple) else value
    if meta.get("bleu_tokenize") and "bleu_tokenize" in config.train:
        config.train.bleu_tokenize = meta["bleu_tokenize"]
    return config


def run_evaluation(model_path: str | os.PathLike, out_dir: str | os.PathLike, *, split: str = "test",
                   src_file: str | None = None, ref_file: str | None = None, average_last: int = 1,
                   step: int | None = None, data_overrides: Mapping[str, Any] | None = None,
                   decode_overrides: Mapping[str, Any] | None = None, limit: int | None = None,
                   tokenize: str | None = None) -> BleuResult:
    """Translate a test set and write `out_dir/{split}.hyp` (one line per source), `bleu.json` and `bleu.txt`.

    Without `tokenize`, sacreBLEU's tokenizer is the run's `train.bleu_tokenize` (default 13a)."""
    from jaxformer.translate import load_translator

    model_path = pathlib.Path(model_path)
    translator = load_translator(model_path, step=step, average_last=average_last)
    config = _run_config(model_path)
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
        from jaxformer.data import read_pairs

        for key, value in (data_overrides or {}).items():
            config.data[key] = value
        pairs = read_pairs(config.data, split)
        sources, references = [p[0] for p in pairs], [p[1] for p in pairs]
        origin = f"split {split!r} of data.source={config.data.source}"
        name = split
    if limit is not None:
        sources, references = sources[:limit], references[:limit]
    if not sources:
        raise ValueError(f"no sentences to evaluate in {origin}")
    start = time.time()
    hypotheses = translator.translate(sources, **dict(decode_overrides or {}))
    seconds = time.time() - start
    result = corpus_bleu(hypotheses, references, tokenize=tokenize)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.hyp").write_text("".join(h.replace("\n", " ") + "\n" for h in hypotheses), encoding="utf-8")
    settings = dict(translator.decode)
    settings.update({k: v for k, v in (decode_overrides or {}).items() if v is not None})
    info = {**result.to_json(), "model": str(model_path), "average_last": average_last, "step": step,
            "test_set": origin, "decode": settings, "seconds": round(seconds, 2),
            "sentences_per_second": round(len(sources) / max(seconds, 1e-9), 2)}
    (out / "bleu.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / "bleu.txt").write_text(f"{result.text}\n{result.signature}\n")
    log.info("%s on %d sentences of %s", result.text, len(sources), origin)
    return result
