"""jaxformer's compiled train step beside an equivalent PyTorch step, timed in one run: tokens/s, ratio, MFU.

    pip install -e ".[bench]"                                 # torch==2.13.0 (a CPU build on these machines)
    python benchmarks/train_vs_pytorch.py                     # small and base shapes
    python benchmarks/train_vs_pytorch.py --shapes small --repeats 7

Shapes (float32, dropout 0.1, label smoothing 0.1, Adam(0.9, 0.98, 1e-9)):
  small: d_model 256, 3+3 layers, 4 heads, d_ff 1024, vocab 8000, batch 64 x (32+32) tokens;
  base:  the paper's base model (d_model 512, 6+6 layers, 8 heads, d_ff 2048), vocab 37000, 16 x (32+32);
  tiny:  d_model 32, 1+1 layers, vocab 500, 8 x (8+8): a check that the benchmark runs, in seconds.

jaxformer: `jaxformer.steps.Steps.train` (forward, label-smoothed loss, backward, Adam update; jit-compiled),
on one CPU device. train.py splits each batch over every core instead (`train.cpu_data_parallel`); to time
that, run this with XLA_FLAGS=--xla_force_host_platform_device_count=<cores>.
PyTorch: `nn.Transformer` (post-LN layers, batch_first, no final stack norms, as in the paper and jaxformer)
between a shared embedding x sqrt(d_model) (source, target and the tied output projection) plus sinusoidal
positions and dropout 0.1; `F.cross_entropy(label_smoothing=0.1, ignore_index=PAD)` summed over target tokens
and divided by their number; `torch.optim.Adam(betas=(0.9, 0.98), eps=1e-9)`; eager mode (torch.compile
is not used: it needs a C++ toolchain per shape and is not what a plain PyTorch training script runs).

Both steps get the same batch (random tokens, no padding). Repeats are interleaved (jax, torch, jax,
torch, ...) after warm-up, so both see the same machine load; the figures are medians, and `ratio` is the
median of the per-pair ratios torch_step_s / jax_step_s (> 1: jaxformer is faster).

MFU: model matmul FLOPs per step over step time, divided by the fp32 matmul peak measured in the same run:
before each round of the interleaved steps, the best of 3 square 2048^3 matmuls in jax and in torch
(whichever is faster); `peak_gflop_s` is the median over the rounds. FLOPs count non-pad tokens only:
    3 x [ L_enc (n_src (8 d^2 + 4 d d_ff) + 4 d S n_src)
        + L_dec (n_tgt (8 d^2 + 4 d d_ff) + 4 d T n_tgt + n_tgt 4 d^2 + n_src 4 d^2 + 4 d S n_tgt)
        + 2 d V n_tgt ]
with n_src / n_tgt the batch's non-pad source / target tokens, S / T the (padded) row lengths, d = h d_k,
V the vocabulary; x3 for forward + backward. Embedding lookups, norms and softmaxes are not counted.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import TINY_SHAPE, device_summary, report  # noqa: E402
from jaxformer import parallel  # noqa: E402
from jaxformer.config import default_config  # noqa: E402
from jaxformer.data import PAD_ID  # noqa: E402
from jaxformer.model import Transformer, TransformerConfig, sinusoidal_positions  # noqa: E402
from jaxformer.steps import Steps  # noqa: E402

SHAPES = {
    "small": dict(model=dict(vocab_size=8000, d_model=256, d_ff=1024, num_heads=4, num_encoder_layers=3,
                             num_decoder_layers=3), batch=64, src_len=32, tgt_len=32),
    "base": dict(model=dict(vocab_size=37000), batch=16, src_len=32, tgt_len=32),
    "tiny": TINY_SHAPE,
}
FLOP_FORMULA = ("3 * [L_enc*(n_src*(8d^2 + 4*d*d_ff) + 4*d*S*n_src) + L_dec*(n_tgt*(8d^2 + 4*d*d_ff) + "
                "4*d*T*n_tgt + 4d^2*n_tgt + 4d^2*n_src + 4*d*S*n_tgt) + 2*d*V*n_tgt], n_* = non-pad tokens")


def train_flops(cfg: TransformerConfig, src, tgt_out) -> float:
    """FLOP_FORMULA for one batch (d_k = d_v = d / h here)."""
    d, ff, vocab = cfg.d_model, cfg.d_ff, cfg.vocab_size
    n_src, n_tgt = float(np.sum(src != PAD_ID)), float(np.sum(tgt_out != PAD_ID))
    s, t = src.shape[1], tgt_out.shape[1]
    enc = n_src * (8 * d * d + 4 * d * ff) + 4 * d * s * n_src
    dec = n_tgt * (8 * d * d + 4 * d * ff) + 4 * d * t * n_tgt + 4 * d * d * n_tgt + 4 * d * d * n_src \
        + 4 * d * s * n_tgt
    return 3.0 * (cfg.num_encoder_layers * enc + cfg.num_decoder_layers * dec + 2 * d * vocab * n_tgt)


def make_batch(cfg: TransformerConfig, spec: dict) -> dict:
    rng = np.random.default_rng(0)
    b, s, t = spec["batch"], spec["src_len"], spec["tgt_len"]
    return {"src": rng.integers(4, cfg.vocab_size, (b, s)).astype(np.int32),
            "tgt_in": rng.integers(4, cfg.vocab_size, (b, t)).astype(np.int32),
            "tgt_out": rng.integers(4, cfg.vocab_size, (b, t)).astype(np.int32)}


def jax_step(cfg: TransformerConfig, host: dict):
    """A zero-argument function running one compiled jaxformer train step (blocks until it is done)."""
    mesh = parallel.make_mesh()
    steps = Steps.from_config(Transformer(cfg), default_config().train, mesh)  # as train.py runs the step
    holder = {"state": steps.init_state(seed=0)}
    batch = parallel.shard_batch(host, mesh)

    def step():
        holder["state"], metrics = steps.train(holder["state"], batch)
        return float(jax.block_until_ready(metrics["loss"]))
    return step


def torch_step(cfg: TransformerConfig, host: dict):
    """A zero-argument function running one eager PyTorch train step of the equivalent model."""
    import torch
    from torch import nn
    import torch.nn.functional as F

    torch.manual_seed(0)
    d = cfg.d_model

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(cfg.vocab_size, d, padding_idx=PAD_ID)
            nn.init.normal_(self.embed.weight, std=d ** -0.5)
            self.register_buffer("positions", torch.from_numpy(sinusoidal_positions(cfg.max_len, d)))
            self.dropout = nn.Dropout(cfg.dropout_rate)
            layer = dict(d_model=d, nhead=cfg.num_heads, dim_feedforward=cfg.d_ff, dropout=cfg.dropout_rate,
                         batch_first=True, norm_first=False)
            encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(**layer), cfg.num_encoder_layers,
                                            enable_nested_tensor=False)
            decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(**layer), cfg.num_decoder_layers)
            self.transformer = nn.Transformer(d_model=d, nhead=cfg.num_heads, custom_encoder=encoder,
                                              custom_decoder=decoder, batch_first=True)

        def embed_positions(self, tokens):
            x = self.embed(tokens) * math.sqrt(d) + self.positions[: tokens.shape[1]]
            return self.dropout(x)

        def forward(self, src, tgt_in):
            src_pad, tgt_pad = src == PAD_ID, tgt_in == PAD_ID
            causal = nn.Transformer.generate_square_subsequent_mask(tgt_in.shape[1], dtype=torch.bool)
            y = self.transformer(self.embed_positions(src), self.embed_positions(tgt_in), tgt_mask=causal,
                                 src_key_padding_mask=src_pad, tgt_key_padding_mask=tgt_pad,
                                 memory_key_padding_mask=src_pad, tgt_is_causal=True)
            return F.linear(y, self.embed.weight)  # tied pre-softmax projection

    model = Model().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9)
    src, tgt_in, tgt_out = (torch.from_numpy(host[k]).long() for k in ("src", "tgt_in", "tgt_out"))

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits = model(src, tgt_in)
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), tgt_out.reshape(-1), ignore_index=PAD_ID,
                               label_smoothing=0.1, reduction="sum")
        (loss / (tgt_out != PAD_ID).sum()).backward()
        optimizer.step()
        return float(loss.detach())
    return step


def matmul_peak_probe(size: int = 2048):
    """A zero-argument function returning the fp32 matmul FLOP/s of this moment: the best of 3 square
    size^3 matmuls in jax and 3 in torch (whichever library is faster here)."""
    import torch
    a, b = jax.random.normal(jax.random.key(0), (2, size, size), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    ta, tb = torch.randn(size, size), torch.randn(size, size)
    runs = (lambda: jax.block_until_ready(matmul(a, b)), lambda: ta @ tb)

    def probe():
        best = math.inf
        for run in runs:
            for _ in range(3):
                start = time.perf_counter()
                run()
                best = min(best, time.perf_counter() - start)
        return 2 * size ** 3 / best
    probe()
    return probe


def measure(shape: str, repeats: int, probe) -> list[dict]:
    spec = SHAPES[shape]
    cfg = TransformerConfig(**spec["model"], dropout_rate=0.1, dtype="float32")
    host = make_batch(cfg, spec)
    steps = {"jaxformer": jax_step(cfg, host), "pytorch": torch_step(cfg, host)}
    for step in steps.values():  # compile / warm up
        step(), step()
    times = {name: [] for name in steps}
    peaks = []
    for _ in range(repeats):  # interleaved: both steps and the peak probe see the same load
        peaks.append(probe())
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    peak = float(np.median(peaks))
    flops = train_flops(cfg, host["src"], host["tgt_out"])
    tokens = int(np.sum(host["src"] != PAD_ID) + np.sum(host["tgt_out"] != PAD_ID))
    ratios = sorted(t / j for j, t in zip(times["jaxformer"], times["pytorch"]))
    rows = []
    for name, values in times.items():
        seconds = float(np.median(values))
        rows.append({"shape": shape, "impl": name, "batch": f"{spec['batch']}x({spec['src_len']}+{spec['tgt_len']})",
                     "step_s": seconds, "step_s_min": min(values), "step_s_max": max(values),
                     "tokens_per_s": tokens / seconds, "model_gflop_per_step": flops / 1e9,
                     "model_gflop_s": flops / seconds / 1e9, "peak_gflop_s": peak / 1e9,
                     "mfu": flops / seconds / peak, "repeats": repeats,
                     "jax_over_torch_speed": float(np.median(ratios)) if name == "jaxformer" else None,
                     "ratio_range": f"{ratios[0]:.2f}-{ratios[-1]:.2f}" if name == "jaxformer" else None})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["small", "base"], choices=sorted(SHAPES))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        sys.exit("train_vs_pytorch.py needs PyTorch: pip install -e '.[bench]' (torch==2.13.0)")
    print(f"# device: {device_summary()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{os.cpu_count()} CPUs")
    print(f"# FLOPs per step: {FLOP_FORMULA}")
    probe = matmul_peak_probe()
    rows = [row for shape in args.shapes for row in measure(shape, args.repeats, probe)]
    report(rows, ["shape", "impl", "batch", "step_s", "tokens_per_s", "model_gflop_s", "peak_gflop_s", "mfu",
                  "jax_over_torch_speed", "ratio_range"])


if __name__ == "__main__":
    main()
