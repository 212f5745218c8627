"""One of `correctness`'s checks: batches ending in all-PAD rows (as the last batch of a split, and multi-host
padding, have) give finite losses and parameters with every attention implementation."""

from __future__ import annotations

import dataclasses
import math

from .batches import first_batches
from .context import Context, applicable_impls, guarded, load_tokenizer, one_device_mesh


def all_pad_check(ctx: Context):
    """Evaluation batches with all-PAD rows give a finite loss over the same tokens with every attention
    implementation, and a train step on such a batch keeps the parameters finite (auto, and cuDNN with
    lengths). A small model: the hazard is in the masks. Each implementation runs in bf16 on both layouts
    (cuDNN with a dense mask when packed), einsum (bf16) and XLA in float32 on the unpacked one; a dry run,
    XLA float32 on both."""
    import jax

    from jaxformer import parallel
    from jaxformer.attention import accelerator_platform
    from jaxformer.model import TransformerConfig, init_params

    c = ctx.multi30k_config()
    tokenizer = load_tokenizer(ctx)
    small = dict(d_model=64, d_ff=128, num_heads=4, num_encoder_layers=1, num_decoder_layers=1)
    base = TransformerConfig.from_dict({**c.model.to_dict(), **small}, vocab_size=tokenizer.vocab_size)
    params = init_params(base, jax.random.key(0))  # float32 master weights, whatever the compute dtype
    platform = accelerator_platform()
    train_dtype = "bfloat16" if platform == "cuda" else "float32"  # XLA CPU has no bf16 x bf16 -> f32 dot
    combos = [("float32", "xla")] if ctx.dry else (
        [("bfloat16", impl) for impl in applicable_impls(platform)] + [("bfloat16", "einsum"), ("float32", "xla")])
    for layout, batch in first_batches(ctx, c, "valid").items():
        rows, length = batch["src"].shape
        padded = parallel.pad_batch(batch, rows + 8, length)  # 8 all-PAD rows at the end
        tokens = int((batch["tgt_out"] != 0).sum())
        for dtype, impl in combos:
            if layout == "packed" and (impl == "einsum" or dtype == "float32") and not ctx.dry:
                continue
            cfg = dataclasses.replace(base, dtype=dtype, attention_impl=impl)
            yield from guarded(f"all-PAD rows {layout} {impl} {dtype}", _all_pad_eval, ctx, c.train, cfg, params,
                               layout, padded, tokens)
        train_impls = ["auto"] + (["cudnn"] if platform == "cuda" and layout == "unpacked" else [])
        for impl in train_impls:
            cfg = dataclasses.replace(base, dtype=train_dtype, attention_impl=impl)
            yield from guarded(f"all-PAD rows train {layout} {impl}", _all_pad_train, ctx, c.train, cfg, layout, padded)


def _all_pad_eval(ctx: Context, train_cfg, cfg, params, layout: str, padded, tokens: int):
    from jaxformer import parallel
    from jaxformer.model import Transformer
    from jaxformer.steps import Steps, summarize

    mesh = one_device_mesh()
    mark = len(ctx.attention_log.lines)
    steps = Steps.from_config(Transformer(cfg), train_cfg, mesh)
    result = summarize(steps.evaluate(parallel.replicate(params, mesh), [parallel.shard_batch(padded, mesh)]))
    yield {"what": "eval loss with all-PAD rows", "layout": layout, "impl": cfg.attention_impl, "dtype": cfg.dtype,
           "metric": "loss", "value": result["loss"], "tolerance": "finite, over the real tokens only",
           "pass": math.isfinite(result["loss"]) and result["tokens"] == tokens,
           "attention_log": ctx.attention_log.lines[mark:]}


def _all_pad_train(ctx: Context, train_cfg, cfg, layout: str, padded):
    import numpy as np

    from jaxformer import parallel
    from jaxformer.model import Transformer
    from jaxformer.steps import Steps

    mesh = one_device_mesh()
    steps = Steps.from_config(Transformer(cfg), train_cfg, mesh)
    state, metrics = steps.train(steps.init_state(0), parallel.shard_batch(padded, mesh))
    ok = bool(steps.all_finite(state.params)) and bool(np.isfinite(float(metrics["loss"])))
    yield {"what": "train step with all-PAD rows", "layout": layout, "impl": cfg.attention_impl, "dtype": cfg.dtype,
           "metric": "loss", "value": float(metrics["loss"]) / max(float(metrics["tokens"]), 1.0),
           "tolerance": "finite loss and parameters", "pass": ok}
