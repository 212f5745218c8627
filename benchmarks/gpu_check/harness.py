"""The parent: arguments, the part registry, each part in a process of its own under its time limit, and the
results (printed rows, results.jsonl, table.txt, log.txt); and the child's side, which runs one part."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

from common import table

from .context import DRY_RUN_XLA_FLAGS, ENTRY, REPO, AttentionLog, Context
from .step_timing import FLOP_FORMULA

DEFAULT_WORK = os.path.join(tempfile.gettempdir(), "jaxformer_gpu_check")
DEFAULT_DATA = os.path.join(REPO, ".gpu_check_data")
SHARED_DATA = os.path.join(REPO, "..", "shared", "data", "multi30k")


class Part(NamedTuple):
    limit_s: float       # on a GPU
    dry_limit_s: float   # in a dry run
    columns: list[str]   # of its table


# Run in this order; part NAME is the generator `run(ctx)` of module part_NAME.
PARTS = {
    "data": Part(30, 45, ["what", "pieces", "pairs", "datasets", "note"]),
    "env": Part(30, 30, ["what", "device_kind", "platform", "compute_capability", "jax", "jaxlib", "cudnn", "tflops",
                         "memory_limit_gib"]),
    "correctness": Part(150, 150, ["what", "layout", "impl", "dtype", "metric", "value", "tolerance", "pass", "note"]),
    "speed": Part(150, 90, ["model", "pack", "impl", "resolved", "batch", "pad_eff", "compile_s", "step_ms",
                            "tgt_tokens_per_s", "tgt_tokens_per_s_all_buckets", "mfu", "mfu_slots", "step_gib"]),
    "memory": Part(70, 60, ["what", "model", "rows", "tokens_per_batch", "step_gib", "peak_gib", "limit_gib", "fits",
                            "note"]),
    "decode": Part(40, 40, ["what", "dtype", "batch_size", "sentences", "seconds", "sentences_per_s", "compile_s",
                            "bleu", "params"]),
}
SUMMARY_COLUMNS = ["part", "status", "seconds", "rows", "errors", "failed_checks"]


def main(argv=None) -> int:
    from . import __doc__ as doc

    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--out", help="results folder (results.jsonl, table.txt, log.txt); required")
    parser.add_argument("--data", default=None, help="folder with train/val/test2016 .en/.de (default: "
                        ".gpu_check_data in the checkout, else ../shared/data/multi30k)")
    parser.add_argument("--work", default=None, help=f"scratch folder: vocabulary, token caches, runs, compilation "
                        f"cache; a rerun reuses it (default: {DEFAULT_WORK}; a fresh temporary one with --dry-run)")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS))
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock limit for all parts together (default: 470, dry run 420)")
    parser.add_argument("--dry-run", action="store_true", help="every part on the CPU with tiny shapes")
    parser.add_argument("--part", help=argparse.SUPPRESS)            # internal: run one part in this process
    parser.add_argument("--limit-s", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.data is None:
        args.data = DEFAULT_DATA if os.path.isdir(DEFAULT_DATA) else SHARED_DATA
    args.data = os.path.abspath(args.data)
    if args.part:
        return run_part(args)

    if not args.out:
        parser.error("--out RESULTS_DIR is required")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"--parts: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    for name in ("train", "test2016"):
        if not os.path.isfile(os.path.join(args.data, f"{name}.en")):
            parser.error(f"--data {args.data}: missing {name}.en (run benchmarks/gpu_check_prepare.sh, or give the "
                         f"folder of train/val/test2016 .en/.de files)")
    budget = args.budget_s if args.budget_s is not None else (420.0 if args.dry_run else 470.0)
    work = args.work or (tempfile.mkdtemp(prefix="gpu_check_") if args.dry_run else DEFAULT_WORK)
    os.makedirs(work, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    deadline = time.monotonic() + budget
    print(f"# gpu_check: parts {','.join(parts)}; budget {budget:.0f} s; data {args.data}; work {work}"
          f"{'; dry run on the CPU' if args.dry_run else ''}", flush=True)

    rows, summaries, logs = [], [], []
    for name in parts:
        limit = min(PARTS[name].dry_limit_s if args.dry_run else PARTS[name].limit_s, deadline - time.monotonic() - 3)
        if limit < 5:
            summaries.append({"part": name, "what": "summary", "status": "skipped: the budget is spent",
                              "seconds": 0.0, "rows": 0, "errors": 0, "failed_checks": 0})
            continue
        part_rows, summary, log_text = _run_child(name, args, work, limit)
        rows += part_rows
        summaries.append(summary)
        logs.append(f"===== {name} ({summary['status']}, {summary['seconds']} s) =====\n{log_text}")
        for row in part_rows + [summary]:
            print(_json(row), flush=True)
        _write_results(args.out, rows, summaries, logs)
    text = _write_results(args.out, rows, summaries, logs)
    print()
    print(text)
    if args.dry_run and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    ok = all(s["status"] == "ok" and not s["errors"] and not s["failed_checks"] for s in summaries)
    return 0 if ok else 1


def _run_child(name: str, args, work: str, limit: float) -> tuple[list[dict], dict, str]:
    """Run one part in a subprocess (its own process group) for at most `limit` seconds."""
    rows_path, log_path = os.path.join(work, f"{name}.jsonl"), os.path.join(work, f"{name}.log")
    open(rows_path, "w").close()
    cmd = [sys.executable, ENTRY, "--part", name, "--data", args.data,
           "--work", work, "--limit-s", f"{limit:.1f}"] + (["--dry-run"] if args.dry_run else [])
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    if name == "data" or args.dry_run:
        env["JAX_PLATFORMS"] = "cpu"  # the vocabulary needs no device (get_tokenizer asks jax for the process index)
    if args.dry_run:  # a dry run checks that the code runs, not how fast: compile it quickly
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {DRY_RUN_XLA_FLAGS}".strip()
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=limit)
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the part and what it started (the CPU reference run)
            proc.wait()
            status = f"timeout at {limit:.0f} s"
    rows = []
    with open(rows_path) as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    with open(log_path, errors="replace") as f:
        log_text = f.read()
    summary = {"part": name, "what": "summary", "status": status, "seconds": round(time.monotonic() - start, 1),
               "rows": len(rows), "errors": sum("error" in r for r in rows),
               "failed_checks": sum(r.get("pass") is False for r in rows)}
    return rows, summary, log_text


def _write_results(out: str, rows: list[dict], summaries: list[dict], logs: list[str]) -> str:
    """results.jsonl, table.txt and log.txt in `out` (each written whole, then renamed); returns the tables."""
    sections = []
    for name, part in PARTS.items():
        part_rows = [r for r in rows if r.get("part") == name and r.get("what") != "flop formula"]  # footnote
        if part_rows:
            sections.append(f"## {name}\n{table(part_rows, part.columns)}")
    errors = [f"{r['part']} / {r.get('what')}: {r['error']}" for r in rows if "error" in r]
    if errors:
        sections.append("## errors\n" + "\n".join(errors))
    sections.append(f"## summary\n{table(summaries, SUMMARY_COLUMNS)}")
    if any(r.get("part") == "speed" for r in rows):
        sections.append(FLOP_FORMULA)
    text = "\n\n".join(sections) + "\n"
    for filename, content in (("results.jsonl", "".join(_json(r) + "\n" for r in rows + summaries)),
                              ("table.txt", text), ("log.txt", "\n".join(logs))):
        tmp = os.path.join(out, f".{filename}.tmp")
        with open(tmp, "w") as f:
            f.write(content)
        os.replace(tmp, os.path.join(out, filename))
    return text


def _json(row: dict) -> str:
    return json.dumps(row, default=lambda v: v.item() if hasattr(v, "item") else str(v))


def run_part(args) -> int:
    """Child process: run part `args.part`, appending each row to <work>/<part>.jsonl as it comes."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname).1s %(name)s] %(message)s")
    logging.getLogger("jaxformer").setLevel(logging.INFO)
    attention_log = AttentionLog()
    logging.getLogger("jaxformer").addHandler(attention_log)
    margin = 3.0
    ctx = Context(args.data, args.work, args.dry_run, time.monotonic() + (args.limit_s or 600) - margin,
                  attention_log)
    if args.part == "cpu_reference":  # the correctness part's CPU run, in its own process
        from .part_correctness import cpu_reference

        return cpu_reference(ctx)
    import jax

    # Later parts (memory after speed) and a rerun with the same --work reuse the compiled programs.
    jax.config.update("jax_compilation_cache_dir", os.path.join(ctx.work, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    part = importlib.import_module(f".part_{args.part}", __package__)
    rows_path = os.path.join(ctx.work, f"{args.part}.jsonl")
    with open(rows_path, "a") as f:
        for row in part.run(ctx):
            row = {"part": args.part, **row}
            f.write(_json(row) + "\n")
            f.flush()
            print(f"row: {_json(row)}", file=sys.stderr, flush=True)
    return 0
