"""Does a long evaluation finish on a multi-device CPU? Copies of one loop, side by side, on every core.

    python benchmarks/cpu_queue.py --copies 3 --rounds 250              # as the library runs it
    python benchmarks/cpu_queue.py --copies 3 --rounds 250 --unbounded  # without the wait
    XLA_FLAGS=--xla_backend_optimization_level=0 python benchmarks/cpu_queue.py ...  # slower programs, as in tests

Each copy is a process with one JAX CPU device per core that runs `Steps.evaluate` (one chained program
with an all-reduce per batch) over --batches tiny batches, --rounds times. XLA's CPU client lets 32
programs wait per device; the launch of one more blocks a thread that also runs programs, and with few
cores an all-reduce then waits for ever: XLA aborts the process after 40 s (exit 134). The library waits
every `parallel.CPU_PROGRAMS_IN_FLIGHT` programs; --unbounded lifts that. Copies share the cores, as the
test suite's workers do. Prints a JSON line per copy and a table: exit status, seconds, rounds done.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))


def one_copy(rounds: int, batches: int, unbounded: bool) -> None:
    import jax
    import numpy as np

    from jaxformer import parallel
    from jaxformer.config import default_config
    from jaxformer.model import Transformer, TransformerConfig
    from jaxformer.steps import Steps

    parallel.use_every_cpu_core()
    if unbounded:
        parallel.CPU_PROGRAMS_IN_FLIGHT = 10 ** 9
    model = Transformer(TransformerConfig(vocab_size=64, d_model=32, d_ff=64, num_heads=2, num_encoder_layers=1,
                                          num_decoder_layers=1))
    mesh = parallel.make_mesh()
    steps = Steps.from_config(model, default_config().train, mesh)
    params = steps.init_state(0).params
    rows = 4 * len(jax.devices())
    tokens = np.random.default_rng(0).integers(4, 64, (batches, rows, 8)).astype(np.int32)
    host = [{"src": t, "tgt_in": t, "tgt_out": t} for t in tokens]
    for done in range(1, rounds + 1):
        steps.evaluate(params, parallel.global_batches(host, mesh))
        print(json.dumps({"rounds_done": done, "devices": len(jax.devices())}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=250)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--unbounded", action="store_true", help="no wait: XLA's own queue of 32 per device")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per copy")
    parser.add_argument("--copy", action="store_true", help=argparse.SUPPRESS)  # one copy, run by main
    args = parser.parse_args()
    if args.copy:
        return one_copy(args.rounds, args.batches, args.unbounded)
    from common import report

    command = [sys.executable, __file__, "--copy", "--rounds", str(args.rounds), "--batches", str(args.batches)]
    command += ["--unbounded"] if args.unbounded else []
    started = time.monotonic()
    outputs = [tempfile.TemporaryFile("w+") for _ in range(args.copies)]  # a pipe could fill and stall a copy
    copies = [subprocess.Popen(command, stdout=out, stderr=subprocess.DEVNULL, text=True) for out in outputs]
    rows = []
    for i, (copy, out) in enumerate(zip(copies, outputs)):
        try:
            copy.wait(timeout=max(1.0, args.timeout - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            copy.kill()
            copy.wait()
        out.seek(0)
        lines = [json.loads(line) for line in out.read().splitlines() if line.startswith("{")]
        row = {"copy": i, "unbounded": args.unbounded, "exit": copy.returncode,
               "seconds": round(time.monotonic() - started, 1), "rounds_done": lines[-1]["rounds_done"] if lines else 0,
               "rounds": args.rounds, "batches": args.batches, "devices": lines[-1]["devices"] if lines else None}
        rows.append(row)
    report(rows, ["copy", "unbounded", "exit", "seconds", "rounds_done", "rounds", "devices"])
    sys.exit(0 if all(r["exit"] == 0 for r in rows) or args.unbounded else 1)


if __name__ == "__main__":
    main()
