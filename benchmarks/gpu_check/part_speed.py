"""Part `speed`: non-pad target tokens/s and MFU of the base and big train steps (bf16, the WMT14 configs'
25k-token batches) per attention implementation, packing on and off."""

from __future__ import annotations

from .context import Context, applicable_impls, guarded
from .part_env import bf16_peak
from .step_timing import FLOP_FORMULA, measure_step, speed_batches, speed_models


def resolved_impl(cfg, pack: bool) -> tuple[str, str]:
    """(implementation, reason): what `choose_attention_impl` makes of cfg.attention_impl in the train step."""
    from jaxformer.attention import accelerator_platform, choose_attention_impl

    return choose_attention_impl(cfg.attention_impl, platform=accelerator_platform(), dtype=cfg.compute_dtype,
                                 head_dim_k=cfg.head_dim_k, head_dim_v=cfg.head_dim_v, structured_mask=not pack,
                                 needs_weights=cfg.attention_dropout_rate > 0)


def run(ctx: Context):
    """Base first, then big; per packing, "auto" first (its choice logged), then the other implementations.

    Unpacked, the timed batches are one bucket's (`speed_batches`); `tgt_tokens_per_s_all_buckets` scales their
    rate by the padding of every bucket's batches against theirs, as if a slot cost the same in every bucket."""
    from jaxformer.attention import accelerator_platform
    from jaxformer.data import padding_efficiency

    peak = bf16_peak(ctx)
    yield {"what": "flop formula", "note": FLOP_FORMULA, "bf16_peak_tflops": peak / 1e12}
    impls = applicable_impls(accelerator_platform())
    count, warmup, repeats = (2, 1, 2) if ctx.dry else (4, 2, 10)
    for name, config in speed_models(ctx).items():
        for pack in (True, False):
            batches, efficiency = speed_batches(ctx, config, pack, count)
            timed_efficiency = padding_efficiency(batches)
            done = set()
            for impl in ["auto"] + impls:
                if impl in done:
                    continue
                if ctx.left() < 20:
                    yield {"what": "train step", "model": name, "pack": pack, "impl": impl,
                           "note": "skipped: the part's time is spent"}
                    continue
                mark = len(ctx.attention_log.lines)

                def one():
                    m = measure_step(ctx, config, batches, impl=impl, warmup=warmup, repeats=repeats)
                    choice = resolved_impl(m["cfg"], pack)
                    done.add(choice[0])
                    rate, flop_rate = m["tgt_tokens"] / m["step_s"], 1.0 / m["step_s"] / peak
                    yield {"what": "train step", "model": name, "pack": pack, "impl": impl, "resolved": choice[0],
                           "dtype": config.model.dtype, "batch": m["batch"], "pad_eff": timed_efficiency,
                           "pad_eff_all_buckets": efficiency, "compile_s": m["compile_s"], "step_ms": 1e3 * m["step_s"],
                           "tgt_tokens_per_s": rate,
                           "tgt_tokens_per_s_all_buckets": rate * efficiency / timed_efficiency,
                           "mfu": m["useful_flops"] * flop_rate, "mfu_slots": m["slot_flops"] * flop_rate,
                           "step_gib": m["step_gib"], "tgt_tokens_per_step": m["tgt_tokens"],
                           "loss_finite": m["loss_finite"], "attention_log": ctx.attention_log.since(mark, choice)}

                yield from guarded(f"train step {name} pack={pack} impl={impl}", one)
                done.add(impl)
