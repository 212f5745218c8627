"""Two of `correctness`'s checks: the device computes what the CPU does, for the model's logits (bf16 against
float32) and for beam search (float32)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools

from jaxformer.steps import OPTIONAL_FIELDS  # the packed batches' extra fields

from .batches import first_batches
from .context import Context, applicable_impls, guarded, load_tokenizer, rms
from .multi30k_run import trained_model


@functools.lru_cache(maxsize=None)
def _logits_fn(cfg):
    import jax

    from jaxformer.model import Transformer

    model = Transformer(cfg)
    return jax.jit(lambda params, b: model.apply(params, b["src"], b["tgt_in"],
                                                 **{k: b[k] for k in OPTIONAL_FIELDS if k in b}))


def logits_check(ctx: Context):
    """The same parameters and batch: bf16 logits on the device against float32 logits on the CPU.

    Tolerance: the RMS difference over non-pad target positions must be at most twice the CPU's own bf16 one
    (the CPU computing the same logits in bf16, against its float32), so the device adds no more than bf16
    rounding does. float32 at matmul precision "float32" must agree to a relative RMS of 1e-4; float32 at the
    default precision (which on a GPU may use TF32 matmuls) is reported without a check. A dry run checks the
    unpacked batch at the default precision only (the device is the CPU).
    """
    import jax
    import numpy as np

    from jaxformer.attention import accelerator_platform
    from jaxformer.model import TransformerConfig, init_params

    c = ctx.multi30k_config()
    tokenizer = load_tokenizer(ctx)
    base = TransformerConfig.from_dict(c.model.to_dict(), vocab_size=tokenizer.vocab_size)
    params = init_params(base, jax.random.key(0))
    cpu, device = jax.devices("cpu")[0], jax.devices()[0]
    platform = accelerator_platform()

    def logits(where, batch, precision=None, **overrides):
        cfg = dataclasses.replace(base, **overrides)
        fn = _logits_fn(cfg)
        with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
            return np.asarray(fn(jax.device_put(params, where), jax.device_put(batch, where)))

    for layout, batch in first_batches(ctx, c).items():
        if ctx.dry and layout == "packed":
            continue
        real = batch["tgt_out"] != 0
        ref32 = logits(cpu, batch, dtype="float32", attention_impl="xla")[real]
        scale = rms(ref32)
        noise = rms(logits(cpu, batch, dtype="bfloat16", attention_impl="xla")[real] - ref32)
        common = {"what": "logits vs CPU float32", "layout": layout, "batch": list(batch["src"].shape),
                  "positions": int(real.sum())}

        def bf16(impl):
            diff = logits(device, batch, dtype="bfloat16", attention_impl=impl)[real] - ref32
            yield {**common, "impl": impl, "dtype": "bfloat16", "metric": "rms diff", "value": rms(diff),
                   "tolerance": 2 * noise, "pass": rms(diff) <= 2 * noise, "max_abs_diff": float(np.abs(diff).max()),
                   "logits_rms": scale, "note": "tolerance: 2 x the CPU's own bf16 rms diff"}

        def float32(precision, check):
            diff = logits(device, batch, precision, dtype="float32", attention_impl="xla")[real] - ref32
            row = {**common, "impl": "xla", "dtype": "float32", "metric": "relative rms diff",
                   "value": rms(diff) / scale, "max_abs_diff": float(np.abs(diff).max()),
                   "note": f"matmul precision {precision or 'default'}"}
            if check:
                row.update(tolerance=1e-4, **{"pass": rms(diff) / scale <= 1e-4})
            yield row

        for impl in applicable_impls(platform):
            yield from guarded(f"logits {layout} {impl} bfloat16", bf16, impl)
        if layout == "unpacked":
            for i, precision in enumerate((None,) if ctx.dry else ("float32", None)):
                yield from guarded(f"logits {layout} float32 precision {precision}", float32, precision, i == 0)


def beam_check(ctx: Context):
    """Beam search (beam 4, float32) over 16 test2016 sentences: the device's outputs must equal the CPU's at
    matmul precision "float32"; at the default precision the differing rows are reported (a dry run checks the
    default precision: its device is the CPU)."""
    import jax
    import numpy as np

    from jaxformer import decode
    from jaxformer.data import EOS_ID

    translator, what = trained_model(ctx)
    with open(ctx.data_file("test", "en")) as f:
        sentences = [next(f).strip() for _ in range(16)]
    ids = translator.tokenizer.encode(sentences)
    src = np.zeros((len(ids), max(map(len, ids)) + 1), np.int32)
    for row, seq in enumerate(ids):
        src[row, :len(seq)], src[row, len(seq)] = seq, EOS_ID
    settings = dict(beam_size=4, alpha=float(translator.decode["length_penalty"]),
                    max_extra_len=int(translator.decode["max_extra_len"]))
    cpu, device = jax.devices("cpu")[0], jax.devices()[0]

    def search(where, precision=None):
        params = jax.device_put(translator.params, where)
        with jax.default_device(where), \
                (jax.default_matmul_precision(precision) if precision else contextlib.nullcontext()):
            tokens, scores = decode.beam_search(translator.model, params, jax.device_put(src, where), **settings)
            return np.asarray(tokens), np.asarray(scores)

    ref_tokens, ref_scores = search(cpu)
    for i, precision in enumerate((None,) if ctx.dry else ("float32", None)):
        tokens, scores = search(device, precision)
        differing = int((tokens != ref_tokens).any(axis=1).sum())
        row = {"what": "beam search vs CPU", "impl": "cached decode", "dtype": "float32", "metric": "rows differing",
               "value": differing, "max_score_diff": float(np.abs(scores - ref_scores).max()),
               "sentences": len(sentences), "note": f"matmul precision {precision or 'default'}; {what}"}
        if i == 0:
            row.update(tolerance=0, **{"pass": differing == 0})
        yield row
