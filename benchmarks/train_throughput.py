"""Training throughput of the library's compiled train step: tokens/s, step time, model FLOP/s and MFU.

    python benchmarks/train_throughput.py                     # small and base shapes, float32
    python benchmarks/train_throughput.py --shapes small --dtype bfloat16

Shapes: "small" is d_model=256, 3+3 layers, 4 heads, d_ff=1024, vocab 8000, batch 64 x (32+32) tokens;
"base" is the paper's base model (vocab 37000) on the same batch; "tiny" only checks that it runs. The
step is jaxformer.steps.Steps.train: forward, label-smoothed loss, backward and the Adam update, with
dropout, over a mesh of every device.
MFU divides the model's matmul FLOP/s by this machine's measured square-matmul peak for the dtype.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import (TINY_SHAPE, device_summary, matmul_peak_flops, report, time_calls,  # noqa: E402
                    transformer_train_flops)
from jaxformer import parallel  # noqa: E402
from jaxformer.config import default_config  # noqa: E402
from jaxformer.model import Transformer, TransformerConfig  # noqa: E402
from jaxformer.steps import Steps  # noqa: E402

SHAPES = {
    "small": dict(model=dict(vocab_size=8000, d_model=256, d_ff=1024, num_heads=4, num_encoder_layers=3,
                             num_decoder_layers=3), batch=64, src_len=32, tgt_len=32),
    "base": dict(model=dict(vocab_size=37000), batch=64, src_len=32, tgt_len=32),
    "tiny": TINY_SHAPE,
}


def measure(shape: str, dtype: str, attention_impl: str, repeats: int, peak: float) -> dict:
    spec = SHAPES[shape]
    cfg = TransformerConfig(**spec["model"], dtype=dtype, attention_impl=attention_impl)
    mesh = parallel.make_mesh()
    steps = Steps.from_config(Transformer(cfg), default_config().train, mesh)  # as train.py runs the step
    state = steps.init_state(seed=0)
    rng = np.random.default_rng(0)
    b, s, t = spec["batch"], spec["src_len"], spec["tgt_len"]
    host = {"src": rng.integers(4, cfg.vocab_size, (b, s)), "tgt_in": rng.integers(4, cfg.vocab_size, (b, t)),
            "tgt_out": rng.integers(4, cfg.vocab_size, (b, t))}
    batch = parallel.shard_batch({k: v.astype(np.int32) for k, v in host.items()}, mesh)
    holder = {"state": state}

    def one_step():
        holder["state"], metrics = steps.train(holder["state"], batch)
        return metrics["loss"]

    seconds = time_calls(one_step, warmup=2, repeats=repeats)
    flops = transformer_train_flops(cfg, b, s, t)
    tokens = b * (s + t)
    return {"shape": shape, "dtype": dtype, "attention": attention_impl, "devices": len(jax.devices()),
            "batch": f"{b}x({s}+{t})", "step_s": seconds, "tokens_per_s": tokens / seconds,
            "model_tflops_per_step": flops / 1e12, "model_gflop_s": flops / seconds / 1e9,
            "peak_gflop_s": peak / 1e9, "mfu": flops / seconds / peak}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["small", "base"], choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn", "einsum"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"# device: {device_summary()}")
    peak = matmul_peak_flops(jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32)
    rows = [measure(shape, args.dtype, args.attention, args.repeats, peak) for shape in args.shapes]
    report(rows, ["shape", "dtype", "attention", "devices", "batch", "step_s", "tokens_per_s", "model_gflop_s",
                  "peak_gflop_s", "mfu"])


if __name__ == "__main__":
    main()
