"""What a weight gradient's matmul costs on XLA CPU beside the forward one, and where the train step copies.

    python benchmarks/dot_layouts.py                       # the small shape's FFN: 2048 tokens, 256 -> 1024
    python benchmarks/dot_layouts.py --tokens 1024         # one device's half of it, data parallel on 2 cores
    python benchmarks/dot_layouts.py --step small          # also: the compiled train step's dots and their copies

A dense layer y = x @ W with x [T, d_in] makes three matmuls of the same 2·T·d_in·d_out FLOPs per step:
the forward (contracting x's minor dimension), dx = dy @ Wᵀ, and dW = xᵀ @ dy, which contracts the token
dimension, the major one of both operands. Each is jitted alone and timed in --repeats interleaved
rounds (per round the median of 10 calls, then the median over rounds), so the ratios hold on a busy
machine; dW is timed in the forms JAX's autodiff and a hand-written backward pass would write it.

With --step, the train step of `train_vs_pytorch.py`'s shape is compiled as train.py builds it and its
optimized HLO is searched: how many dots run as YNN fusions and how many as XLA's own `dot` (the Eigen
path), and how many of the latter read an operand that a transposing copy made first.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from common import device_summary, report, time_calls  # noqa: E402


def matmul_forms(tokens: int, d_in: int, d_out: int) -> dict:
    """{name: (jitted fn, args)}: the forward, dx and dW products of one dense layer."""
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(k[0], (tokens, d_in))
    dy = jax.random.normal(k[1], (tokens, d_out))
    w = jax.random.normal(k[2], (d_in, d_out))
    return {
        "forward x@W": (jax.jit(lambda x, w: x @ w), (x, w)),
        "dx dy@W.T": (jax.jit(lambda dy, w: dy @ w.T), (dy, w)),
        "dW einsum td,tf->df (autodiff's)": (jax.jit(lambda x, dy: jnp.einsum("td,tf->df", x, dy)), (x, dy)),
        "dW (dy.T@x).T": (jax.jit(lambda x, dy: (dy.T @ x).T), (x, dy)),
        "dW transpose(x) copied, then @dy": (
            jax.jit(lambda x, dy: jax.lax.optimization_barrier(x.T) @ dy), (x, dy)),
    }


def time_forms(forms: dict, repeats: int, calls: int = 10) -> dict:
    """{name: median seconds per call}: each round times every form once (`calls` calls), in turn."""
    times = {name: [] for name in forms}
    for round_ in range(repeats):
        for name, (fn, args) in forms.items():
            times[name].append(time_calls(lambda: fn(*args), warmup=int(round_ == 0), repeats=calls))
    return {name: statistics.median(v) for name, v in times.items()}


def step_dots(shape: str) -> dict:
    """Counts of the dots in the compiled train step of `shape` (see the module docstring)."""
    from jaxformer import parallel
    from jaxformer.model import Transformer
    from jaxformer.steps import Steps
    from step_ab import step_inputs

    data = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "multi30k")
    with tempfile.TemporaryDirectory(prefix="dot_layouts-") as tmp:
        cfg, host, train_cfg = step_inputs(shape, data, tmp)
        mesh = parallel.make_mesh()
        steps = Steps.from_config(Transformer(cfg), train_cfg, mesh)
        state = steps.init_state(seed=0)
        hlo = steps.train.lower(state, parallel.shard_batch(host[0], mesh)).compile().as_text()
    entry = hlo[hlo.index("\nENTRY"):]
    producers = dict(re.findall(r"^\s+(?:ROOT )?%(\S+) = \S+ (\S+?)\(", entry, re.M))
    plain = re.findall(r"^\s+(?:ROOT )?%\S+ = \S+ dot\(%([^,]+), %([^)]+)\), lhs_contracting_dims=\{(\d)\}",
                       entry, re.M)
    copied = sum(any(name.startswith(("copy", "transpose")) or producers.get(name) in ("copy", "transpose")
                     for name in (lhs, rhs)) for lhs, rhs, _ in plain)
    return {"shape": shape, "ynn_fusions": len(re.findall(r"^\s+(?:ROOT )?%ynn_fusion\S* = ", entry, re.M)),
            "plain_dots": len(plain), "plain_dots_major_contraction": sum(c == "0" for *_, c in plain),
            "plain_dots_reading_a_copy": copied}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--d-out", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--step", default=None, help="also count the dots of this train_vs_pytorch.py shape's step")
    args = parser.parse_args(argv)
    print(f"# device: {device_summary()}; {os.cpu_count()} CPUs; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    flops = 2.0 * args.tokens * args.d_in * args.d_out
    medians = time_forms(matmul_forms(args.tokens, args.d_in, args.d_out), args.repeats)
    forward = medians["forward x@W"]
    rows = [{"product": name, "shape": f"{args.tokens}x{args.d_in}->{args.d_out}", "ms": s * 1e3,
             "gflop_s": flops / s / 1e9, "time_vs_forward": s / forward} for name, s in medians.items()]
    report(rows, ["product", "shape", "ms", "gflop_s", "time_vs_forward"])
    if args.step:
        report([step_dots(args.step)], ["shape", "ynn_fusions", "plain_dots", "plain_dots_major_contraction",
                                        "plain_dots_reading_a_copy"])


if __name__ == "__main__":
    main()
