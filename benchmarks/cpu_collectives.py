"""How the data-parallel step's gradient sum costs on CPU devices: all-reduce, reduce-scatter, and what
GSPMD emits for a sum constrained to a split (the step with `train.shard_optimizer_state`).

    python benchmarks/cpu_collectives.py                  # 76 MB, the base shape's embedding gradient
    python benchmarks/cpu_collectives.py --mb 252         # base's whole gradient

Each of the N devices (every core, `parallel.use_every_cpu_core()`, as train.py runs) holds one float32
vector of the given size; the three programs sum them over the "data" axis:
- all-reduce: `jax.lax.psum` in `jax.shard_map`, every device gets the whole sum (replicated moments);
- reduce-scatter: `jax.lax.psum_scatter`, each device gets its 1/N of the sum (what ZeRO-1 needs);
- gspmd: `jit` of the sum with `with_sharding_constraint` to the split, as `jaxformer.steps` writes it.
Prints the median wall time of 7 calls and the collectives in each compiled program.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from common import device_summary, report, time_calls  # noqa: E402
from jaxformer import parallel  # noqa: E402

COLLECTIVES = ("all-reduce", "reduce-scatter", "all-gather", "dynamic-slice")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=37000 * 512 * 4 / 2**20, help="MiB per device (float32)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    parallel.use_every_cpu_core()
    print(f"# device: {device_summary()}; {os.cpu_count()} CPUs")
    mesh = parallel.make_mesh()
    n = mesh.devices.size
    size = int(args.mb * 2**20 / 4) // n * n
    x = jax.device_put(np.ones((n, size), np.float32), parallel.batch_sharded(mesh))
    programs = {
        "all-reduce": jax.shard_map(lambda v: jax.lax.psum(v[0], "data"), mesh=mesh, in_specs=P("data"),
                                    out_specs=P()),
        "reduce-scatter": jax.shard_map(lambda v: jax.lax.psum_scatter(v[0], "data", tiled=True), mesh=mesh,
                                        in_specs=P("data"), out_specs=P("data")),
        "gspmd": lambda v: jax.lax.with_sharding_constraint(v.sum(0), NamedSharding(mesh, P("data"))),
    }
    rows = []
    for name, fn in programs.items():
        compiled = jax.jit(fn).lower(x).compile()
        text = compiled.as_text()
        ops = [op for op in COLLECTIVES if f" {op}(" in text or f" {op}-start(" in text]
        seconds = time_calls(lambda: compiled(x), warmup=1, repeats=args.repeats)
        rows.append({"program": name, "devices": n, "mib": size * 4 / 2**20, "ms": 1000 * seconds,
                     "ops": " ".join(ops)})
    report(rows, ["program", "devices", "mib", "ms", "ops"])


if __name__ == "__main__":
    main()
