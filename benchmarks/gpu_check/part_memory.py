"""Part `memory`: peak device memory of the base and big train steps, and the largest big batch that fits."""

from __future__ import annotations

from .context import GIB, Context, guarded, is_out_of_memory
from .step_timing import measure_step, speed_batches, speed_models


def run(ctx: Context):
    """Peak device memory (`memory_stats()`) after the base, then the big step (packed, "auto"), in a fresh
    process; then the largest big batch: a line through the compiled step's memory at two batch sizes
    predicts the rows that fill 95% of the device's limit, and one step at that size confirms it (or 85% of it)."""
    import jax

    models = speed_models(ctx)
    device = jax.devices()[0]
    limit = (device.memory_stats() or {}).get("bytes_limit")
    big_batch, big_step_gib = None, None  # of the last model: "big" (a dry run has "base" only)
    for name, config in models.items():
        def one(name=name, config=config):
            nonlocal big_batch, big_step_gib
            batches, _ = speed_batches(ctx, config, True, 1)
            m = measure_step(ctx, config, batches, impl="auto", warmup=1, repeats=1)
            stats = device.memory_stats() or {}
            big_batch, big_step_gib = batches[0], m["step_gib"]
            yield {"what": "train step memory", "model": name, "rows": int(batches[0]["src"].shape[0]),
                   "tokens_per_batch": int(config.data.tokens_per_batch), "step_gib": m["step_gib"],
                   "peak_gib": stats.get("peak_bytes_in_use", 0) / GIB or None,
                   "limit_gib": stats.get("bytes_limit", 0) / GIB or None,
                   "note": "peak: process peak so far (memory_stats); step: compiled memory_analysis"}
        yield from guarded(f"train step memory {name}", one)
    if big_batch is None:
        return
    last = list(models)[-1]
    yield from guarded(f"largest {last} batch", _largest_batch, ctx, last, models[last], big_batch, big_step_gib,
                       limit)


def _largest_batch(ctx: Context, name: str, config, batch, step_gib, limit):
    import jax
    import numpy as np

    rows, length = batch["src"].shape
    if limit is None:  # no device limit on a CPU: the dry run pretends a small one, to run the search
        limit = int(4 * step_gib * GIB)
    tiled = lambda n: {k: np.resize(v, (n, length)) for k, v in batch.items()}  # noqa: E731  rows repeated
    second = measure_step(ctx, config, [tiled(2 * rows)], impl="auto", warmup=0, repeats=1)
    per_row = (second["step_gib"] - step_gib) / rows
    predicted = int(rows + (0.95 * limit / GIB - step_gib) / max(per_row, 1e-12))
    yield {"what": f"largest {name} batch: prediction", "model": name, "rows": predicted,
           "tokens_per_batch": predicted * length, "step_gib": step_gib + per_row * (predicted - rows),
           "limit_gib": limit / GIB, "note": f"line through {rows} and {2 * rows} rows"}
    for factor in (1.0, 0.85):
        n = max(rows, int(predicted * factor))
        if ctx.left() < 15:
            yield {"what": f"largest {name} batch", "model": name, "rows": n,
                   "note": "skipped: the part's time is spent"}
            return
        try:
            m = measure_step(ctx, config, [tiled(n)], impl="auto", warmup=0, repeats=1)
        except Exception as e:  # noqa: BLE001
            if not is_out_of_memory(e):
                raise
            yield {"what": f"largest {name} batch", "model": name, "rows": n, "tokens_per_batch": n * length,
                   "fits": False, "note": str(e)[:200]}
            continue
        stats = jax.devices()[0].memory_stats() or {}
        yield {"what": f"largest {name} batch", "model": name, "rows": n, "tokens_per_batch": n * length,
               "fits": True, "step_gib": m["step_gib"], "peak_gib": stats.get("peak_bytes_in_use", 0) / GIB or None,
               "limit_gib": limit / GIB, "step_ms": 1e3 * m["step_s"],
               "note": f"the packed {config.data.tokens_per_batch}-slot batch's rows repeated; tokens: slots a side"}
        return
