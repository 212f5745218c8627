"""Where the compiled train step spends its time: a jax.profiler trace, summarised by XLA op.

    python benchmarks/profile_step.py                         # small shape of train_vs_pytorch.py
    python benchmarks/profile_step.py --shape multi30k        # real Multi30k batches, configs/multi30k.py
    python benchmarks/profile_step.py --top 40 --trace-dir /tmp/step_trace   # keep the trace (Perfetto / TensorBoard)
    python benchmarks/profile_step.py --textbook-head   # the loss head before jaxformer/loss.py (step_ab.py)

Traces `--steps` train steps after warm-up and prints, per step: the busiest XLA ops by thread time, each
with its output shape and the JAX operation it came from (from the compiled HLO's metadata), the thread
time per op kind, and on CPU how busy the XLA worker threads were (the fraction of the traced window in
which each thread ran an op, both ran one, and none did). Thread times add over threads: an op split over
two threads counts twice.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import gzip
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from common import device_summary  # noqa: E402
from jaxformer import parallel  # noqa: E402
from jaxformer.model import Transformer  # noqa: E402
from jaxformer.steps import Steps  # noqa: E402
from step_ab import step_inputs, textbook_head  # noqa: E402
from train_vs_pytorch import SHAPES  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NOT_OPS = ("Execute", "Await", "Threadpool", "end: ", "Wait for", "PjitFunction", "ParseArguments",
            "CreateOutputs", "Handle inputs", "Allocate", "PythonRefManager")


def op_metadata(hlo_text: str) -> dict[str, tuple[str, str]]:
    """{HLO instruction name: (output shape, JAX op_name)} from compiled HLO text."""
    found = {}
    for match in re.finditer(r"^\s+(?:ROOT )?%(\S+) = (\S+) .*?op_name=\"([^\"]*)\"", hlo_text, re.M):
        found[match.group(1)] = (match.group(2), match.group(3))
    return found


def summarise(trace_file: str, metadata: dict, steps: int, top: int) -> None:
    events = json.load(gzip.open(trace_file))["traceEvents"]
    ops = [e for e in events if e.get("ph") == "X" and not e["name"].startswith("$")
           and not any(word in e["name"] for word in _NOT_OPS) and e.get("dur", 0) > 0]
    by_op, by_kind = collections.Counter(), collections.Counter()
    for e in ops:
        by_op[e["name"]] += e["dur"]
        by_kind[re.sub(r"\.\d+$", "", e["name"])] += e["dur"]
    print(f"\n# busiest ops (thread ms per step, {steps} steps traced)")
    for name, micros in by_op.most_common(top):
        shape, origin = metadata.get(name, ("", ""))
        print(f"{micros / 1e3 / steps:9.1f}  {name:30s} {shape:28s} {origin[-110:]}")
    print("\n# by op kind (thread ms per step)")
    for name, micros in by_kind.most_common(12):
        print(f"{micros / 1e3 / steps:9.1f}  {name}")
    print(f"{sum(by_kind.values()) / 1e3 / steps:9.1f}  (all ops)")
    workers = collections.Counter(e["tid"] for e in ops)
    threads = [tid for tid, count in workers.items() if count >= 0.05 * len(ops)]
    if not threads:
        return
    start = min(e["ts"] for e in ops)
    end = max(e["ts"] + e["dur"] for e in ops)
    grid = np.zeros((len(threads), int((end - start) / 50) + 1), bool)  # 50 µs cells
    for e in ops:
        if e["tid"] in threads:
            grid[threads.index(e["tid"]), int((e["ts"] - start) / 50):int((e["ts"] + e["dur"] - start) / 50) + 1] = True
    print(f"\n# worker threads over the traced {(end - start) / 1e3:.0f} ms: busy "
          + ", ".join(f"{b:.0%}" for b in grid.mean(axis=1))
          + f"; all at once {np.mean(grid.all(axis=0)):.0%}; none {np.mean(~grid.any(axis=0)):.0%}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="small", choices=sorted(SHAPES) + ["multi30k"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--trace-dir", default=None, help="keep the trace here (default: a temporary folder)")
    parser.add_argument("--textbook-head", action="store_true",
                        help="compile the step with step_ab.py's textbook loss head, for comparison")
    parser.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data", "multi30k"))
    args = parser.parse_args(argv)
    print(f"# device: {device_summary()}; {os.cpu_count()} CPUs; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    with tempfile.TemporaryDirectory(prefix="profile_step-") as tmp:
        cfg, host, train_cfg = step_inputs(args.shape, args.data, tmp)
        mesh = parallel.make_mesh()
        batches = [parallel.shard_batch(b, mesh) for b in host]
        steps = Steps.from_config(Transformer(cfg), train_cfg, mesh)
        state = steps.init_state(seed=0)
        with textbook_head() if args.textbook_head else contextlib.nullcontext():  # matters while tracing
            metadata = op_metadata(steps.train.lower(state, batches[0]).compile().as_text())
            for batch in batches[:2]:  # compile and warm up
                state, metrics = steps.train(state, batch)
                jax.block_until_ready(metrics["loss"])
        trace_dir = args.trace_dir or os.path.join(tmp, "trace")
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for i in range(args.steps):
                state, metrics = steps.train(state, batches[i % len(batches)])
                jax.block_until_ready(metrics["loss"])
        trace_file = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
        print(f"# {args.shape}: batch {'x'.join(map(str, host[0]['tgt_out'].shape))}; trace {trace_file}")
        summarise(trace_file, metadata, args.steps, args.top)


if __name__ == "__main__":
    main()
