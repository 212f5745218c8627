"""The library's train step measured, as `speed` and `memory` use it: the WMT14 recipes on the brought data,
their batches, the step compiled and timed, and the FLOPs it does (`FLOP_FORMULA`)."""

from __future__ import annotations

import contextlib
import math
import time

from .batches import batch_iterator
from .context import GIB, Context, load_config, load_tokenizer, one_device_mesh

FLOP_FORMULA = (
    "train FLOPs = 3 x forward (matmuls only); forward of a pair of s source and t target tokens = "
    "L_enc*[s*(2D(2hK+2hV) + 4DF) + 2s^2(hK+hV)] + L_dec*[t*(2D(2hK+2hV) + 2D(hK+hV) + 4DF) + 2t^2(hK+hV) "
    "+ 2sD(hK+hV) + 2ts(hK+hV)] + 2tD*vocab (causal attention counted whole; benchmarks/common.py "
    "transformer_train_flops). mfu sums it over the batch's real pairs, mfu_slots over its rows x length "
    "(what the step computes, padding and cross-pair attention included); both over the measured bf16 peak")


def speed_models(ctx: Context) -> dict:
    """{"base": config, "big": config}: configs/wmt14_base.py and wmt14_big.py in bf16 with the brought data
    (float32 on a CPU, whose XLA has no bf16 x bf16 -> float32 products; a dry run: a tiny "base" only)."""
    from jaxformer.attention import accelerator_platform

    out = {}
    for name in ("base",) if ctx.dry else ("base", "big"):
        c = ctx.with_files(load_config(f"wmt14_{name}"))
        c.model.dtype = "bfloat16" if accelerator_platform() != "cpu" else "float32"
        if ctx.dry:
            c.model.update(d_model=32, d_ff=64, num_heads=2, num_encoder_layers=1, num_decoder_layers=1)
            c.data.tokens_per_batch = 1024
            c.data.bucket_lengths = (16, 24, 32, 48, 64)
            c.data.max_len = 64
        out[name] = c
    return out


def speed_batches(ctx: Context, config, pack: bool, count: int) -> tuple[list, float]:
    """`count` train batches (host numpy) of one shape, and the padding efficiency of all the batches drawn.

    Packed batches all have one shape; unpacked ones take the shape (bucket) most batches had among the first
    40 drawn, so that one compile measures the common case."""
    from jaxformer.data import padding_efficiency

    config.data.pack = pack
    iterator = batch_iterator(config, load_tokenizer(ctx), "train", repeat=True, shuffle=True)
    drawn = [next(iterator) for _ in range(count if pack else 40)]
    shapes = [b["src"].shape for b in drawn]
    common = max(set(shapes), key=shapes.count)
    chosen = [b for b in drawn if b["src"].shape == common][:count]
    return chosen, padding_efficiency(drawn)


def pair_lengths(batch) -> tuple:
    """(source lengths, target lengths) of the pairs in a batch, EOS / BOS included, from its PAD / segments."""
    import numpy as np

    if "src_segments" not in batch:
        real = batch["tgt_out"].any(axis=1)
        return (np.count_nonzero(batch["src"], axis=1)[real], np.count_nonzero(batch["tgt_out"], axis=1)[real])
    s, t = [], []
    for src_seg, tgt_seg in zip(batch["src_segments"], batch["tgt_segments"]):
        n = int(max(src_seg.max(), tgt_seg.max()))
        s.append(np.bincount(src_seg, minlength=n + 1)[1:])
        t.append(np.bincount(tgt_seg, minlength=n + 1)[1:])
    return np.concatenate(s), np.concatenate(t)


def useful_train_flops(cfg, batches) -> float:
    """FLOP_FORMULA over the batches' real pairs."""
    from common import transformer_train_flops

    total = 0.0
    for batch in batches:
        s, t = pair_lengths(batch)
        total += float(transformer_train_flops(cfg, 1, s.astype(float), t.astype(float)).sum())
    return total


def step_memory(compiled) -> float | None:
    """GiB the compiled step needs on the device: arguments + outputs - donated + temporaries."""
    with contextlib.suppress(Exception):
        m = compiled.memory_analysis()
        return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                + m.temp_size_in_bytes) / GIB
    return None


def measure_step(ctx: Context, config, batches, *, impl: str, warmup: int, repeats: int) -> dict:
    """Compile the library's train step (`Steps.from_config`, as train.py builds it) for `batches`' shape,
    then time `repeats` steps cycling over them after `warmup` steps."""
    import jax

    from common import transformer_train_flops
    from jaxformer import parallel
    from jaxformer.model import Transformer, TransformerConfig
    from jaxformer.steps import Steps

    cfg = TransformerConfig.from_dict({**config.model.to_dict(), "attention_impl": impl},
                                      vocab_size=int(config.data.vocab_size))
    mesh = one_device_mesh()
    steps = Steps.from_config(Transformer(cfg), config.train, mesh)
    state = steps.init_state(0)
    device_batches = [parallel.shard_batch(b, mesh) for b in batches]
    start = time.perf_counter()
    compiled = steps.train.lower(state, device_batches[0]).compile()
    compile_s = time.perf_counter() - start
    metrics = None
    for i in range(warmup):
        state, metrics = compiled(state, device_batches[i % len(batches)])
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for i in range(repeats):
        state, metrics = compiled(state, device_batches[i % len(batches)])
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / repeats
    used = [batches[i % len(batches)] for i in range(repeats)]
    tokens = sum(int((b["tgt_out"] != 0).sum()) for b in used) / repeats
    rows, length = batches[0]["src"].shape
    return {"cfg": cfg, "compile_s": compile_s, "step_s": seconds, "tgt_tokens": tokens,
            "useful_flops": useful_train_flops(cfg, used) / repeats,
            "slot_flops": transformer_train_flops(cfg, rows, length, length),
            "step_gib": step_memory(compiled), "batch": f"{rows}x{length}",
            "loss_finite": math.isfinite(float(metrics["loss"]))}
