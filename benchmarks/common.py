"""Helpers shared by the benchmarks: timing, the machine's matmul peak, model FLOPs, printing."""

from __future__ import annotations

import json
import platform
import time

import jax
import jax.numpy as jnp


def device_summary() -> str:
    devices = jax.devices()
    kind = devices[0].device_kind if devices else "?"
    return f"{len(devices)} x {kind} ({jax.default_backend()}), jax {jax.__version__}, {platform.machine()}"


def time_calls(fn, *, warmup: int = 1, repeats: int = 5) -> float:
    """Median wall seconds of `fn()` (which must return something to block on)."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def matmul_peak_flops(dtype=jnp.float32, size: int | None = None) -> float:
    """Measured FLOP/s of a square jit-compiled matmul: this machine's practical peak for the dtype."""
    if size is None:
        size = 2048 if jax.default_backend() == "cpu" else 8192
    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    b = jax.random.normal(jax.random.key(1), (size, size), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    seconds = time_calls(lambda: matmul(a, b), warmup=2, repeats=5)
    return 2 * size ** 3 / seconds


def transformer_train_flops(cfg, batch: int, src_len: int, tgt_len: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3 x forward), counting matmuls only.

    Per token: the attention projections, the attention scores and weighted sums, the FFN and the
    pre-softmax projection; embeddings lookups and norms are not counted (as in the usual MFU figures).
    """
    d, h, dk, dv, ff = cfg.d_model, cfg.num_heads, cfg.head_dim_k, cfg.head_dim_v, cfg.d_ff
    qk, v = h * dk, h * dv
    proj_self = 2 * d * (2 * qk + 2 * v)                    # q, k, v and output projections
    ffn = 2 * 2 * d * ff
    enc = src_len * (proj_self + ffn) + 2 * src_len * src_len * (qk + v)
    dec_self = tgt_len * proj_self + 2 * tgt_len * tgt_len * (qk + v)
    dec_cross = tgt_len * 2 * d * (qk + v) + src_len * 2 * d * (qk + v) + 2 * tgt_len * src_len * (qk + v)
    dec = dec_self + dec_cross + tgt_len * ffn
    out = tgt_len * 2 * d * cfg.vocab_size
    forward = batch * (cfg.num_encoder_layers * enc + cfg.num_decoder_layers * dec + out)
    return 3.0 * forward


def report(rows: list[dict], columns: list[str]) -> None:
    """Print each row as a JSON line, then a readable table of the chosen columns."""
    for row in rows:
        print(json.dumps(row, sort_keys=True))
    print()
    print(table(rows, columns))


def table(rows: list[dict], columns: list[str]) -> str:
    """The chosen columns of `rows` as aligned text, a header line first."""
    widths = {c: max([len(c)] + [len(_fmt(r.get(c))) for r in rows]) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(_fmt(row.get(c)).ljust(widths[c]) for c in columns).rstrip() for row in rows]
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return "" if value is None else str(value)


# A shape of the train benchmarks that compiles and runs in seconds: it checks that a benchmark runs (the README
# test); its figures mean little.
TINY_SHAPE = dict(model=dict(vocab_size=500, d_model=32, d_ff=64, num_heads=2, num_encoder_layers=1,
                             num_decoder_layers=1), batch=8, src_len=8, tgt_len=8)
