"""Text in, text out: batching, bucketing and detokenization around `jaxformer.decode`.

    import jaxformer
    translator = jaxformer.load("runs/multi30k")          # a training workdir or an export directory
    translator(["A man rides a horse."])                  # -> ["Ein Mann reitet ein Pferd."]
    translator("A dog runs.", beam_size=1)                # one string in, one string out

Sentences are sorted by length and decoded in batches of `decode.batch_size` rows whose source length
is rounded up to one of `SOURCE_BUCKETS` (and whose row count is padded to a power of two below the
batch size), so `jit` compiles a handful of shapes however many sentences come; the output keeps the
input order. An empty (or blank) sentence translates to "" without running the model.

The position table (`model.max_len`) bounds both sides, and translation goes on rather than failing
a whole file for a few long lines, with one warning per call naming the keys: a source longer than
`max_len - 1` tokens is truncated so that it and its EOS fit; an output may hold up to its input
length (with EOS) + `decode.max_extra_len` tokens, but never more than `model.max_len`, so where
that sum exceeds the table the output limit is the table. The cap binds only for a translation that
runs that long (usually a loop, not a sentence), so capping is what a user expects; to get the full
"input + max_extra_len", train with a larger `model.max_len` (sinusoidal positions cost no parameters).
Training refuses a table shorter than its longest batch (`jaxformer.config.check_lengths`).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer import parallel
from jaxformer.config import decode_settings
from jaxformer.data import EOS_ID, PAD_ID
from jaxformer.model import Transformer

__all__ = ["Translator", "translate_texts", "translate_ids", "search_ids", "score_ids", "decode_settings",
           "SOURCE_BUCKETS"]

log = logging.getLogger(__name__)

SOURCE_BUCKETS = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


def _bucket(length: int, cap: int) -> int:
    for b in SOURCE_BUCKETS:
        if b >= length:
            return min(b, cap)
    return cap


def _rows(n: int, batch_size: int) -> int:
    """Rows of a batch holding n sentences: the batch size, or the next power of two below it."""
    if n >= batch_size:
        return batch_size
    return min(batch_size, 1 << max(0, (n - 1).bit_length()))


def translate_ids(model: Transformer, params, src_ids: Sequence[Sequence[int]], decode_cfg: Mapping | None = None,
                  **overrides) -> list[list[int]]:
    """Token-level translation: source ids (without EOS) -> output ids (without EOS/PAD), input order kept.

    Sources longer than the model's max_len - 1 are truncated, and outputs capped at max_len (both with one
    logged warning naming the keys; see the module docstring); an empty source gives [].
    """
    return [hyps[0]["tokens"] if hyps else [] for hyps in search_ids(model, params, src_ids, decode_cfg, **overrides)]


def search_ids(model: Transformer, params, src_ids: Sequence[Sequence[int]], decode_cfg: Mapping | None = None, *,
               nbest: int = 1, with_scores: bool = False, prefixes: Sequence[Sequence[int]] | None = None,
               sampling: str | None = None, temperature: float = 1.0, seed: int = 0, first_index: int = 0,
               grammar=None, **overrides) -> list[list[dict]]:
    """`translate_ids` with each sentence's `nbest` best hypotheses, best first (beam search; N <= beam size):
    [{"tokens": ids, "score": length-penalised log-prob, "log_prob": the sum of its token log-probs, EOS
    included}, ...]; an empty source gives []. Greedy search (beam size 1) gives one hypothesis, scored
    (teacher-forced, `score_ids`) when `with_scores`; without it greedy's "score"/"log_prob" are None.
    `prefixes` (ids, one per source, possibly empty): each output starts with its prefix, forced, and the
    search goes on from there (cut to fit the output limit). `sampling` ("full", "topk:K" or "topp:P", at
    `temperature`) draws `nbest` independent samples per sentence instead of searching; sentence n's sample
    j comes from a key folded from (seed, first_index + n, j), so it does not depend on the batching.
    `grammar` ([V] token kinds, `jaxformer.grammar.kinds_table`) keeps every output a tree over its source,
    one tag per source token (parsing: the source is one token per word)."""
    from jaxformer import decode as decode_lib

    settings = decode_settings(decode_cfg, **overrides)
    draw = None if sampling is None else {**dict(zip(("kind", "top_k", "top_p"), parse_sampling(sampling))),
                                          "temperature": float(temperature)}
    if draw is not None and int(nbest) < 1:
        raise ValueError(f"nbest={nbest}: ask for at least one sample")
    elif draw is None and not 1 <= int(nbest) <= int(settings["beam_size"]):
        raise ValueError(f"nbest={nbest} must be between 1 and the beam size ({settings['beam_size']})")
    if prefixes is not None and len(prefixes) != len(src_ids):
        raise ValueError(f"{len(prefixes)} prefixes for {len(src_ids)} sources: give one per source (empty for none)")
    config = model.config
    limit, extra = config.max_len - 1, int(settings["max_extra_len"])
    sources, truncated, capped = [], [], 0
    for i, ids in enumerate(src_ids):
        ids = [int(t) for t in ids]
        if len(ids) > limit:
            truncated.append((i, len(ids)))
            ids = ids[:limit]
        capped += bool(ids) and len(ids) + 1 + extra > config.max_len
        sources.append(ids)
    if truncated:
        (i, n), more = truncated[0], len(truncated) - 1
        log.warning("sentence %d has %d tokens, more than the model's max_len - 1 = %d; translating only its "
                    "first %d tokens%s", i, n, limit, limit, f" (and {more} more sentences)" if more else "")
    if capped:
        log.warning("%d of %d sentences have input + decode.max_extra_len=%d longer than model.max_len=%d: their "
                    "output is capped at %d tokens (train with a larger model.max_len to lift the cap)",
                    capped, len(sources), extra, config.max_len, config.max_len)
    outputs: list[list[dict]] = [[] for _ in sources]
    todo = sorted((i for i, ids in enumerate(sources) if ids), key=lambda i: -len(sources[i]))  # longest first
    batch_size = int(settings["batch_size"])
    chunks = [todo[start:start + batch_size] for start in range(0, len(todo), batch_size)]
    mesh = parallel.local_mesh()
    mode = _parallel_mode(settings["parallel"], mesh, len(chunks) * (int(nbest) if draw else 1))
    devices = 1 if mesh is None else mesh.devices.size
    if mode == "split" and len(todo) >= devices:
        # A batch with a sentence for each device is split over them: one search, each device its rows.
        split_params = parallel.replicate(params, mesh)
        places = [(split_params, parallel.batch_sharded(mesh)) if len(chunk) >= devices else (params, None)
                  for chunk in chunks]
    elif mode == "batches":
        # Each device searches its own batches, round robin, with no collective between them.
        device_params = [jax.device_put(params, device) for device in mesh.devices.flat]
        chunks = _balanced(chunks, devices)
        places = [(device_params[n % devices], mesh.devices.flat[n % devices]) for n in range(len(chunks))]
    else:
        places = [(params, None)] * len(chunks)

    def finish(chunk, found):
        if not isinstance(found, dict):  # greedy's and sampling's tokens [rows, L]
            found = {"tokens": np.asarray(found)[:, None]}
        found = {key: np.asarray(found[key]) for key in ("tokens", "scores", "log_probs") if key in found}
        for row, i in enumerate(chunk):
            for n, seq in enumerate(found["tokens"][row].tolist()):
                score = float(found["scores"][row, n]) if "scores" in found else None
                if score is not None and score <= decode_lib.NEG_INF / 2:
                    break  # fewer than N hypotheses finished
                if EOS_ID in seq:
                    seq = seq[:seq.index(EOS_ID)]
                log_prob = float(found["log_probs"][row, n]) if "log_probs" in found else None
                outputs[i].append({"tokens": [t for t in seq if t != PAD_ID], "score": score, "log_prob": log_prob})

    in_flight: collections.deque = collections.deque()  # searches dispatched, not yet read back

    def settle(chunk, search):
        """The oldest search in flight: read it back or, once its first segment shows live rows, dispatch its
        later segments (compiled only for batch shapes that reach them) and queue them behind the others."""
        if isinstance(search, decode_lib.Dispatched):
            later = search.later()
            if later is not None:
                in_flight.append((chunk, later))
                return
            search = search.out
        finish(chunk, search)
    limit = 2 * devices  # the host prepares the next batches while the devices search
    if mode == "split":
        limit = min(limit, parallel.programs_in_flight(mesh) or limit)  # see parallel.CPU_PROGRAMS_IN_FLIGHT
    rounds = [(j, chunk, place) for j in range(int(nbest) if draw else 1) for chunk, place in zip(chunks, places)]
    for j, chunk, (search_params, place) in rounds:  # sampling: one round per sample
        src_len = _bucket(max(len(sources[i]) for i in chunk) + 1, config.max_len)
        rows = _rows(len(chunk), batch_size)
        if isinstance(place, jax.sharding.Sharding):
            rows = -(-rows // devices) * devices
        src = np.full((rows, src_len), PAD_ID, np.int32)  # filler rows stay all-PAD (searched in one step)
        for row, i in enumerate(chunk):
            src[row, :len(sources[i])] = sources[i]
            src[row, len(sources[i])] = EOS_ID
        prefix = None
        if prefixes is not None and any(prefixes[i] for i in chunk):
            prefix = np.full((rows, _bucket(max(len(prefixes[i]) for i in chunk), config.max_len)), PAD_ID, np.int32)
            for row, i in enumerate(chunk):
                prefix[row, :len(prefixes[i])] = [int(t) for t in prefixes[i]][:prefix.shape[1]]
        keys = None if draw is None else _sample_keys(seed, [first_index + i for i in chunk], rows, j)
        words = None if grammar is None else np.array([len(sources[i]) for i in chunk] + [0] * (rows - len(chunk)),
                                                      np.int32)  # a tag for each source token
        if place is not None:
            src, prefix, keys, words = (None if a is None else jax.device_put(a, place)
                                        for a in (src, prefix, keys, words))
        in_flight.append((chunk, _search(decode_lib, model, search_params, src, settings, int(nbest), prefix,
                                         None if draw is None else {**draw, "keys": keys},
                                         None if grammar is None else {"kinds": grammar, "words": words})))
        if len(in_flight) >= limit:
            settle(*in_flight.popleft())
    while in_flight:
        settle(*in_flight.popleft())
    unscored = [(i, hyp) for i, hyps in enumerate(outputs) for hyp in hyps if hyp["score"] is None]
    if with_scores and unscored:  # greedy and samples: teacher-forced
        scores = score_ids(model, params, [sources[i] for i, _ in unscored], [h["tokens"] for _, h in unscored],
                           settings)
        for (_, hyp), scored in zip(unscored, scores):
            if scored is not None:
                hyp.update(score=scored["score"], log_prob=scored["log_prob"])
    return outputs


def parse_sampling(spec: str) -> tuple[str, int, float]:
    """"full", "topk:K" or "topp:P" -> (kind, K, P); one line of error for anything else."""
    kind, _, value = str(spec).partition(":")
    try:
        if kind == "full" and not value:
            return "full", 0, 1.0
        if kind == "topk" and int(value) >= 1:
            return "topk", int(value), 1.0
        if kind == "topp" and 0 < float(value) <= 1:
            return "topp", 0, float(value)
    except ValueError:
        pass
    raise ValueError(f"unknown sampling {spec!r}: use full, topk:K (K >= 1) or topp:P (0 < P <= 1)")


def _sample_keys(seed: int, indices: list[int], rows: int, sample: int) -> np.ndarray:
    """PRNG key data [rows, 2] of the sentences at `indices` (filler rows after them), for sample `sample`."""
    base = jax.random.key(int(seed))
    numbers = jnp.asarray(indices + [0] * (rows - len(indices)), jnp.uint32)
    keys = jax.vmap(lambda n: jax.random.fold_in(jax.random.fold_in(base, n), sample))(numbers)
    return np.asarray(jax.random.key_data(keys))


BATCHES_PER_DEVICE = 4  # decode.parallel=auto gives CPU devices their own batches from this many each


def _parallel_mode(requested: str, mesh, batches: int = 0) -> str:
    """"one" (a single device), "split" or "batches" for `decode.parallel` on this process's devices. "auto"
    gives CPU devices their own batches when each gets BATCHES_PER_DEVICE or more: every device compiles the
    search for itself, so a few batches go faster split over the devices (one compiled program)."""
    if mesh is None:
        return "one"
    if requested == "auto":
        cpu = all(d.platform == "cpu" for d in mesh.devices.flat)
        return "batches" if cpu and batches >= BATCHES_PER_DEVICE * mesh.devices.size else "split"
    return requested


def _balanced(chunks: list[list[int]], devices: int) -> list[list[int]]:
    """The batches, with the last one cut into pieces so that every device gets as many batches: a
    leftover batch would otherwise keep one device searching while the others wait."""
    spare = -len(chunks) % devices
    if not chunks or not spare or len(chunks[-1]) <= spare:
        return chunks
    last, pieces = chunks[-1], spare + 1
    size = -(-len(last) // pieces)
    return chunks[:-1] + [last[start:start + size] for start in range(0, len(last), size)]


def _search(decode_lib, model, params, src, settings, nbest: int = 1, prefix=None, draw=None, grammar=None):
    """Dispatch one batch's search (greedy for beam_size 1), staged (`decode_rows.Dispatched`): its outputs
    are {"tokens" [rows, L] from greedy and sampling, [rows, N, L] from beam search, with "scores" and
    "log_probs" [rows, N]}."""
    if draw is not None:
        return decode_lib.sample_search(model, params, src, draw["keys"], kind=draw["kind"], top_k=draw["top_k"],
                                        top_p=draw["top_p"], temperature=draw["temperature"], prefix=prefix,
                                        max_extra_len=int(settings["max_extra_len"]), grammar=grammar, staged=True)
    if int(settings["beam_size"]) == 1:
        return decode_lib.greedy_search(model, params, src, max_extra_len=int(settings["max_extra_len"]),
                                        prefix=prefix, grammar=grammar, staged=True)
    return decode_lib.beam_search_nbest(model, params, src, nbest, beam_size=int(settings["beam_size"]),
                                        alpha=float(settings["length_penalty"]),
                                        max_extra_len=int(settings["max_extra_len"]), stop=settings["stop"],
                                        prefix=prefix, grammar=grammar, staged=True)


def score_ids(model: Transformer, params, src_ids: Sequence[Sequence[int]], tgt_ids: Sequence[Sequence[int]],
              decode_cfg: Mapping | None = None, *, full_softmax: bool = False, **overrides) -> list[dict | None]:
    """Forced decoding: how likely the model finds each given translation. Per pair, in input order,
    {"log_prob": the sum of the target's token log-probs with its EOS, "score": log_prob over the search's
    length penalty (decode.length_penalty), "token_log_probs": one per target token, then EOS's}, under the
    search's distribution, or the whole softmax with `full_softmax` (`decode.token_log_probs`). Batched by
    length as `translate_ids` is. Sources are truncated as there; a target that does not fit the position
    table with its EOS is skipped (None), counted in one warning."""
    from jaxformer import decode as decode_lib

    if len(src_ids) != len(tgt_ids):
        raise ValueError(f"{len(src_ids)} sources but {len(tgt_ids)} targets: score takes one target per source")
    settings = decode_settings(decode_cfg, **overrides)
    config = model.config
    limit = config.max_len - 1
    sources = [[int(t) for t in ids][:limit] for ids in src_ids]
    targets = [[int(t) for t in ids] for ids in tgt_ids]
    if any(len(ids) > limit for ids in src_ids):
        log.warning("%d sources are longer than the model's max_len - 1 = %d tokens: scored on their first %d",
                    sum(len(ids) > limit for ids in src_ids), limit, limit)
    todo = [i for i, ids in enumerate(targets) if len(ids) <= limit]
    if len(todo) < len(targets):
        log.warning("skipped %d of %d pairs whose target is longer than the model's max_len - 1 = %d tokens "
                    "(first: pair %d)", len(targets) - len(todo), len(targets), limit,
                    next(i for i, ids in enumerate(targets) if len(ids) > limit))
    todo.sort(key=lambda i: -max(len(sources[i]), len(targets[i])))
    batch_size, alpha = int(settings["batch_size"]), float(settings["length_penalty"])
    results: list[dict | None] = [None] * len(targets)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        rows = _rows(len(chunk), batch_size)
        src = np.full((rows, _bucket(max(len(sources[i]) for i in chunk) + 1, config.max_len)), PAD_ID, np.int32)
        tgt = np.full((rows, _bucket(max(len(targets[i]) for i in chunk) + 1, config.max_len)), PAD_ID, np.int32)
        for row, i in enumerate(chunk):
            for array, ids in ((src, sources[i]), (tgt, targets[i])):
                array[row, :len(ids)] = ids
                array[row, len(ids)] = EOS_ID
        log_probs = np.asarray(decode_lib.token_log_probs(model, params, src, tgt, full_softmax=full_softmax))
        for row, i in enumerate(chunk):
            values = log_probs[row, :len(targets[i]) + 1]
            total = float(np.sum(values))
            penalty = float(decode_lib.length_penalty(np.float32(len(values)), alpha))
            results[i] = {"log_prob": total, "score": total / penalty, "token_log_probs": values.tolist()}
    return results


def translate_texts(model: Transformer, params, tokenizer, sentences: Sequence[str],
                    decode_cfg: Mapping | None = None, *, nbest: int | None = None, with_scores: bool = False,
                    prefixes: Sequence[str] | None = None, **overrides) -> list[str] | list[list[dict]]:
    """Detokenized translations of `sentences`, in their order. `decode_cfg` is `config.decode`
    (beam_size, length_penalty, max_extra_len, batch_size); beam_size 1 means greedy search. With `nbest`
    or `with_scores`, each sentence's hypotheses instead, best first: [{"text", "score", "log_prob",
    "tokens" (pieces)}] (`search_ids`); a blank sentence has none. `prefixes`: one target prefix per sentence
    (possibly ""), with which its translation starts."""
    if isinstance(sentences, str):
        raise TypeError("translate_texts takes a list of sentences; wrap a single one in a list")
    sentences = list(sentences)
    if not sentences:
        return []
    blank = [not s.strip() for s in sentences]
    ids = tokenizer.encode([s if not b else "" for s, b in zip(sentences, blank)])
    ids = [[] if b else seq for seq, b in zip(ids, blank)]
    if prefixes is not None:
        if isinstance(prefixes, str) or len(prefixes) != len(sentences):
            raise ValueError(f"give one prefix per sentence ({len(sentences)}), possibly empty")
        overrides["prefixes"] = tokenizer.encode(list(prefixes))
    if nbest is None and not with_scores:
        out_ids = translate_ids(model, params, ids, decode_cfg, **overrides)
        texts = tokenizer.decode(out_ids) if out_ids else []
        return ["" if b else t for t, b in zip(texts, blank)]
    found = search_ids(model, params, ids, decode_cfg, nbest=nbest or 1, with_scores=True, **overrides)
    hypotheses = [hyp for hyps in found for hyp in hyps]
    for hyp, text in zip(hypotheses, tokenizer.decode([hyp["tokens"] for hyp in hypotheses]) if hypotheses else []):
        hyp.update(text=text, tokens=[tokenizer.id_to_piece(t) for t in hyp["tokens"]])
    return [[{key: hyp[key] for key in ("text", "score", "log_prob", "tokens")} for hyp in hyps] for hyps in found]


@dataclasses.dataclass
class Translator:
    """A loaded model: the model, its parameters, its vocabulary and default decode settings (what
    `jaxformer.load` returns). Call it (or `.translate`) with a list of sentences, or with one sentence to
    get one string back; it unpacks as `model, params, tokenizer = translator`.
    """

    model: Transformer
    params: Any
    tokenizer: Any
    decode: dict = dataclasses.field(default_factory=decode_settings)
    source: str | None = None  # where it was loaded from
    checkpoint_steps: list[int] | None = None  # from a workdir: the checkpoints averaged into `params`
    config: Any = None  # the run's config (data.*, train.bleu_tokenize), or what an export kept of it

    def __post_init__(self):
        self.decode = decode_settings(self.decode)

    def __iter__(self):
        return iter((self.model, self.params, self.tokenizer))

    def translate(self, sentences: str | Sequence[str], *, beam_size: int | None = None,
                  length_penalty: float | None = None, max_extra_len: int | None = None,
                  batch_size: int | None = None, stop: str | None = None, parallel: str | None = None,
                  nbest: int | None = None, with_scores: bool = False, prefix: str | Sequence[str] | None = None,
                  sampling: str | None = None, temperature: float = 1.0, seed: int = 0, first_index: int = 0):
        """Translations (one string in, one out), or with `nbest` / `with_scores` each sentence's hypotheses
        as dicts (see `translate_texts`). `prefix`: the start of each translation (one per sentence).
        `sampling` ("full", "topk:K", "topp:P"): `nbest` samples at `temperature` instead of the search,
        reproducible by `seed` whatever the batching (`first_index`: the first sentence's index, for a file
        translated in parts)."""
        single = isinstance(sentences, str)
        if prefix is not None and single:
            prefix = [prefix]
        out = translate_texts(self.model, self.params, self.tokenizer, [sentences] if single else sentences,
                              self.decode, nbest=nbest, with_scores=with_scores, prefixes=prefix, beam_size=beam_size,
                              length_penalty=length_penalty, max_extra_len=max_extra_len, batch_size=batch_size,
                              stop=stop, parallel=parallel,
                              **({} if sampling is None else {"sampling": sampling, "temperature": temperature,
                                                              "seed": seed, "first_index": first_index}))
        return out[0] if single else out

    def score(self, sources: Sequence[str], targets: Sequence[str], *, length_penalty: float | None = None,
              batch_size: int | None = None, full_softmax: bool = False) -> list[dict | None]:
        """Forced decoding of each (source, target) pair (see `score_ids`); each result also has "tokens",
        the target's pieces and "</s>", one per token log-prob."""
        if isinstance(sources, str) or isinstance(targets, str):
            raise TypeError("score takes lists of sources and targets; wrap single sentences in lists")
        src_ids, tgt_ids = self.tokenizer.encode(list(sources)), self.tokenizer.encode(list(targets))
        results = score_ids(self.model, self.params, src_ids, tgt_ids, self.decode, full_softmax=full_softmax,
                            length_penalty=length_penalty, batch_size=batch_size)
        for result, ids in zip(results, tgt_ids):
            if result is not None:
                result["tokens"] = [self.tokenizer.id_to_piece(t) for t in ids] + [self.tokenizer.id_to_piece(EOS_ID)]
        return results

    def align(self, sources: Sequence[str], translations: Sequence[str], *,
              layer: int = -1) -> list[list[tuple[int, int]]]:
        """Hard alignments (source piece i, target piece j) of each translation to its source, from one decoder
        layer's cross-attention (`jaxformer.alignment`); pieces as the vocabulary splits the two texts."""
        from jaxformer.alignment import hard_alignments

        return hard_alignments(self.model, self.params, self.tokenizer.encode(list(sources)),
                               self.tokenizer.encode_target(list(translations)), layer=layer)

    __call__ = translate
