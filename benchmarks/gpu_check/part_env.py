"""Part `env`: the device, jax / jaxlib / cuDNN versions, and the measured bf16 (and float32) matmul peak that
the speed part's MFU divides by."""

from __future__ import annotations

import contextlib
import json
import os

from .context import GIB, Context, guarded


def run(ctx: Context):
    yield from guarded("environment", _environment, ctx)
    yield from guarded("matmul peak", _matmul_peaks, ctx)


def _environment(ctx: Context):
    import platform as host

    import flax
    import jax
    import jaxlib
    import numpy as np
    import optax

    from jaxformer.attention import accelerator_platform

    device = jax.devices()[0]
    try:
        from jax._src.lib import cuda_versions  # private: read for the report only

        cudnn = cuda_versions.cudnn_get_version() if cuda_versions is not None else None
    except Exception as e:  # noqa: BLE001
        cudnn = f"unknown ({type(e).__name__})"
    stats = device.memory_stats() or {}
    row = {"what": "environment", "backend": jax.default_backend(), "platform": accelerator_platform(),
           "device_kind": device.device_kind, "devices": jax.device_count(),
           "compute_capability": getattr(device, "compute_capability", None),
           "platform_version": getattr(device.client, "platform_version", None),
           "jax": jax.__version__, "jaxlib": jaxlib.__version__, "cudnn": cudnn, "flax": flax.__version__,
           "optax": optax.__version__, "numpy": np.__version__, "python": host.python_version(),
           "memory_limit_gib": stats.get("bytes_limit", 0) / GIB or None}
    with contextlib.suppress(Exception):
        import orbax.checkpoint as ocp

        row["orbax"] = getattr(ocp, "__version__", None)
    with contextlib.suppress(Exception):
        row["environment_info"] = jax.print_environment_info(return_string=True)
    yield row


def _matmul_peaks(ctx: Context):
    import jax.numpy as jnp

    from common import matmul_peak_flops

    size = 512 if ctx.dry else 8192
    for name, dtype in (("bfloat16", jnp.bfloat16), ("float32", jnp.float32)):
        flops = matmul_peak_flops(dtype, size)
        row = {"what": f"matmul peak {name}", "size": size, "tflops": flops / 1e12,
               "note": "square jit matmul, random normal inputs, median of 5 after 2 warm-ups"}
        if name == "bfloat16":
            with open(os.path.join(ctx.work, "peak.json"), "w") as f:
                json.dump({"bf16_flops": flops}, f)
        yield row


def bf16_peak(ctx: Context) -> float:
    """This part's measured bf16 matmul peak (measured here when this part did not run)."""
    path = os.path.join(ctx.work, "peak.json")
    if os.path.isfile(path):
        with open(path) as f:
            return float(json.load(f)["bf16_flops"])
    import jax.numpy as jnp

    from common import matmul_peak_flops

    return matmul_peak_flops(jnp.bfloat16, 512 if ctx.dry else 8192)
