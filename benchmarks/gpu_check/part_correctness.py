"""Part `correctness`: bf16 logits against the CPU's float32 ones, finite losses on batches with all-PAD rows
for every attention implementation, 200 steps of configs/multi30k.py (`jaxformer.train.run`) beside the same
run on the host's CPU, and beam search against the CPU (float32)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time

from .all_pad import all_pad_check
from .context import DRY_RUN_XLA_FLAGS, ENTRY, Context, guarded
from .multi30k_run import CPU_RUN, DEVICE_RUN, training_config
from .versus_cpu import beam_check, logits_check


def run(ctx: Context):
    reference = _start_cpu_reference(ctx)  # runs beside everything else here, on the host's cores
    try:
        yield from guarded("logits", logits_check, ctx)
        yield from guarded("all-PAD rows", all_pad_check, ctx)
        yield from guarded("train", _train_check, ctx, reference)
        yield from guarded("beam search", beam_check, ctx)
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()


def _start_cpu_reference(ctx: Context) -> subprocess.Popen:
    """The same training run on the CPU, in a process of its own (8 CPU devices, 2 in a dry run: the batch's 32
    rows, 8 in a dry run, split evenly, so its batches are the device's), on the second half of the cores where
    the machine has 8 or more (the first half compiles for the device)."""
    flags = f"--xla_force_host_platform_device_count={2 if ctx.dry else 8}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               XLA_FLAGS=f"{flags} {DRY_RUN_XLA_FLAGS}" if ctx.dry else flags)
    cmd = [sys.executable, ENTRY, "--part", "cpu_reference", "--data",
           ctx.data, "--work", ctx.work] + (["--dry-run"] if ctx.dry else [])
    log = open(os.path.join(ctx.work, "cpu_reference.log"), "w")
    # In this part's process group, so that the parent's stop at the part's limit ends it too.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) >= 8:  # set while it still imports, before XLA sizes its thread pool
        with contextlib.suppress(OSError):
            os.sched_setaffinity(proc.pid, cores[len(cores) // 2:])
    return proc


def cpu_reference(ctx: Context) -> int:
    """The CPU run's process (`--part cpu_reference`)."""
    from jaxformer.train import run as train

    workdir = os.path.join(ctx.work, CPU_RUN)
    shutil.rmtree(workdir, ignore_errors=True)
    train(training_config(ctx, workdir))
    return 0


def _train_check(ctx: Context, reference: subprocess.Popen):
    """200 steps of configs/multi30k.py through `jaxformer.train.run` on the device; the loss must fall by at
    least 1.0 (0.3 in a dry run) from the first logged window to the last and, at every step the CPU run
    beside it has logged, agree with the CPU's to 3% (float32; the GPU's default matmul precision may be TF32)."""
    from jaxformer.train import run as train

    workdir = os.path.join(ctx.work, DEVICE_RUN)
    shutil.rmtree(workdir, ignore_errors=True)
    mark = len(ctx.attention_log.lines)
    start = time.monotonic()
    result = train(training_config(ctx, workdir))
    seconds = time.monotonic() - start
    device = _train_losses(workdir)
    steps = sorted(device)
    drop = device[steps[0]] - device[steps[-1]]
    need = 0.3 if ctx.dry else 1.0
    yield {"what": "train loss falls", "metric": f"loss step {steps[0]} -> {steps[-1]}",
           "value": f"{device[steps[0]]:.3f} -> {device[steps[-1]]:.3f}", "tolerance": f"falls by >= {need}",
           "pass": drop >= need, "seconds": round(seconds, 1), "valid_loss": result.get("valid_loss"),
           "attention_log": ctx.attention_log.lines[mark:], "note": "train.run, configs/multi30k.py, float32"}
    # Wait for the CPU run while this part has time (keeping some for the beam search), then compare.
    cpu_workdir = os.path.join(ctx.work, CPU_RUN)
    while reference.poll() is None and ctx.left() > 40 and len(_train_losses(cpu_workdir)) < len(device):
        time.sleep(1.0)
    cpu = _train_losses(cpu_workdir)
    shared = sorted(set(cpu) & set(device))
    if not shared:
        with open(os.path.join(ctx.work, "cpu_reference.log"), errors="replace") as f:
            tail = f.read()[-1500:]
        raise RuntimeError(f"the CPU run logged no step to compare (exit {reference.poll()}); its log ends: {tail}")
    worst = max(abs(device[s] - cpu[s]) / abs(cpu[s]) for s in shared)
    yield {"what": "train loss as on the CPU", "metric": "max relative diff", "value": worst, "tolerance": 0.03,
           "pass": worst <= 0.03, "steps_compared": shared, "device_losses": [device[s] for s in shared],
           "cpu_losses": [cpu[s] for s in shared], "note": f"{len(shared)} logged steps"}


def _train_losses(workdir: str) -> dict[int, float]:
    """{step: train loss} from a run's metrics.jsonl (what has been written so far)."""
    from jaxformer.metrics import read_records

    return {int(r["step"]): float(r["loss"]) for r in read_records(workdir) if r.get("split") == "train"}
