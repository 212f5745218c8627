"""The GPU path checked and measured by one command: environment, correctness, speed, memory, decode.

    bash benchmarks/gpu_check.sh RESULTS_DIR     # on the GPU machine: the brought wheels and data (docs/gpu_check.md)
    python benchmarks/gpu_check.py --out RESULTS_DIR [--data DIR] [--parts speed,memory] [--budget-s 470]
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check   # every part on the CPU with tiny shapes

Parts, each in its own process under its own time limit (a slow or hung part loses only its own rows; the
parent stops a part's whole process group at its limit):
  data         the shared vocabulary, trained on the brought Multi30k pairs (on the CPU)
  env          device, jax / jaxlib / cuDNN versions, the measured bf16 (and float32) matmul peak
  correctness  bf16 logits against the CPU's float32 ones; finite losses on evaluation batches with all-PAD rows
               for every attention implementation; 200 steps of configs/multi30k.py (`jaxformer.train.run`)
               beside the same run on the host's CPU; beam search on the GPU against the CPU (float32)
  speed        non-pad target tokens/s and MFU of the base and big train steps (bf16, 25k-token batches of
               the WMT14 configs) per attention implementation, packing on and off
  memory       peak device memory of the base and big steps, and the largest big batch that fits
  decode       beam-4 sentences/s on test2016 for the Multi30k model (the one trained by `correctness`)
Every figure is a JSON row: printed, and in <out>/results.jsonl; <out>/table.txt holds one table per part and
<out>/log.txt the parts' logs (with the attention choices `model.attention_impl="auto"` logged). A part's
rows are written as they come, so a part stopped at its limit keeps what it measured. Exit status 0 when
every part finished without an error and every check passed.

The sentences of the speed and memory batches are the brought Multi30k ones (about 15 tokens a side,
half a WMT14 sentence), batched as the WMT14 configs batch them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [HERE, REPO]  # benchmarks/common.py, and this checkout's jaxformer before any installed one

from common import table  # noqa: E402

DEFAULT_WORK = os.path.join(tempfile.gettempdir(), "jaxformer_gpu_check")
DEFAULT_DATA = os.path.join(REPO, ".gpu_check_data")
SHARED_DATA = os.path.join(REPO, "..", "shared", "data", "multi30k")

# name: (time limit on a GPU in seconds, in a dry run, columns of its table); run in this order
PARTS = {
    "data": (30, 45, ["what", "pieces", "pairs", "datasets", "note"]),
    "env": (30, 30, ["what", "device_kind", "platform", "compute_capability", "jax", "jaxlib", "cudnn", "tflops",
                     "memory_limit_gib"]),
    "correctness": (150, 150, ["what", "layout", "impl", "dtype", "metric", "value", "tolerance", "pass", "note"]),
    "speed": (150, 90, ["model", "pack", "impl", "resolved", "batch", "pad_eff", "compile_s", "step_ms",
                        "tgt_tokens_per_s", "tgt_tokens_per_s_all_buckets", "mfu", "mfu_slots", "step_gib"]),
    "memory": (70, 60, ["what", "model", "rows", "tokens_per_batch", "step_gib", "peak_gib", "limit_gib", "fits",
                        "note"]),
    "decode": (40, 40, ["what", "dtype", "batch_size", "sentences", "seconds", "sentences_per_s", "compile_s",
                        "bleu", "params"]),
}
SUMMARY_COLUMNS = ["part", "status", "seconds", "rows", "errors", "failed_checks"]
OPTIONAL_FIELDS = ("src_segments", "tgt_segments", "src_positions", "tgt_positions")  # packed batches only
FLOP_FORMULA = (
    "train FLOPs = 3 x forward (matmuls only); forward of a pair of s source and t target tokens = "
    "L_enc*[s*(2D(2hK+2hV) + 4DF) + 2s^2(hK+hV)] + L_dec*[t*(2D(2hK+2hV) + 2D(hK+hV) + 4DF) + 2t^2(hK+hV) "
    "+ 2sD(hK+hV) + 2ts(hK+hV)] + 2tD*vocab (causal attention counted whole; benchmarks/common.py "
    "transformer_train_flops). mfu sums it over the batch's real pairs, mfu_slots over its rows x length "
    "(what the step computes, padding and cross-pair attention included); both over the measured bf16 peak")
GIB = float(1 << 30)
DRY_RUN_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


# ------------------------------------------------------------------------------------------------ the parent

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
        limit = min(PARTS[name][1 if args.dry_run else 0], deadline - time.monotonic() - 3)
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
    cmd = [sys.executable, os.path.abspath(__file__), "--part", name, "--data", args.data,
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
    for name, (_, _, columns) in PARTS.items():
        part_rows = [r for r in rows if r.get("part") == name and r.get("what") != "flop formula"]  # footnote
        if part_rows:
            sections.append(f"## {name}\n{table(part_rows, columns)}")
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


# ------------------------------------------------------------------------------------------------ a part

class AttentionLog(logging.Handler):
    """Collects the attention choices jaxformer logs ("attention <where>: <impl> implementation (<why>)")."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("attention "):
            self.lines.append(message)

    def since(self, mark: int, choice: tuple[str, str]) -> list[str]:
        """The lines logged after `mark`; else, as jaxformer logs a choice once per process, the earlier lines
        of the same `choice` (implementation, reason)."""
        return self.lines[mark:] or [f"{line} [logged earlier]" for line in self.lines[:mark]
                                     if line.endswith(f": {choice[0]} implementation ({choice[1]})")]


@dataclasses.dataclass
class Context:
    """What every part of one invocation shares: its folders, its mode and its deadline."""

    data: str
    work: str
    dry: bool
    deadline: float
    attention_log: AttentionLog

    def left(self) -> float:
        return self.deadline - time.monotonic()

    @property
    def vocab_path(self) -> str:
        return os.path.join(self.work, "vocab.model")

    def data_file(self, split: str, lang: str) -> str:
        name = {"train": "train", "valid": "val", "test": "test2016"}[split]
        path = os.path.join(self.data, f"{name}.{lang}")
        if split == "valid" and not os.path.isfile(path):
            return self.data_file("test", lang)
        return path

    def with_files(self, c, *, vocab: bool = True):
        """Point config `c` at the brought data, this run's vocabulary and token-cache folder."""
        c.data.source = "files"
        for split, key in (("train", "train_files"), ("valid", "valid_files"), ("test", "test_files")):
            c.data[key] = self.data_file(split, "en")[:-3]
        c.data.cache_dir = os.path.join(self.work, "data_cache")
        if vocab:
            c.data.vocab_model = self.vocab_path
        if self.dry:
            c.data.vocab_size = 300
            c.data.vocab_sample_size = 4000
        return c

    def multi30k_config(self, *, vocab: bool = True):
        c = self.with_files(load_config("multi30k"), vocab=vocab)
        if self.dry:
            c.model.update(d_model=32, d_ff=64, num_heads=2, num_encoder_layers=1, num_decoder_layers=1)
            c.data.tokens_per_batch = 512
        return c


def load_config(name: str):
    """configs/<name>.py's get_config()."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"config_{name}", os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


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
        return _cpu_reference(ctx)
    import jax

    # Later parts (memory after speed) and a rerun with the same --work reuse the compiled programs.
    jax.config.update("jax_compilation_cache_dir", os.path.join(ctx.work, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    fn = {"data": part_data, "env": part_env, "correctness": part_correctness, "speed": part_speed,
          "memory": part_memory, "decode": part_decode}[args.part]
    rows_path = os.path.join(ctx.work, f"{args.part}.jsonl")
    with open(rows_path, "a") as f:
        for row in fn(ctx):
            row = {"part": args.part, **row}
            f.write(_json(row) + "\n")
            f.flush()
            print(f"row: {_json(row)}", file=sys.stderr, flush=True)
    return 0


def guarded(what: str, fn, *args, **kwargs):
    """The rows of generator `fn`, or, when it raises, one row naming the error; the part goes on."""
    try:
        yield from fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - one failed check must not hide the others
        traceback.print_exc()
        yield {"what": what, "error": f"{type(e).__name__}: {str(e)[:500]}"}


def applicable_impls(platform: str) -> list[str]:
    """The attention implementations that run on `platform` ("cudnn" only on a CUDA GPU)."""
    return ["cudnn", "xla"] if platform == "cuda" else ["xla"]


def batch_iterator(config, tokenizer, split: str, *, repeat: bool, shuffle: bool):
    """The library's batches of `split` on one device (`jaxformer.data.make_batches`); where `datasets` does not
    import, the same `BatchIterator` over the files read directly into a `TokenCache`."""
    from jaxformer import data

    try:
        import datasets  # noqa: F401
    except Exception as e:  # noqa: BLE001
        logging.getLogger(__name__).warning("datasets does not import (%s): reading the files directly", e)
        from jaxformer.data.common import clean

        prefix = config.data[f"{split}_files"]
        with open(f"{prefix}.{config.data.src_lang}") as f_src, open(f"{prefix}.{config.data.tgt_lang}") as f_tgt:
            pairs = [clean(s, t) for s, t in zip(f_src, f_tgt)]
        pairs = [(s, t) for s, t, reason in pairs if reason is None]
        limit = min(int(config.data.max_len), max(int(x) for x in config.data.bucket_lengths))
        src, tgt = tokenizer.encode([p[0] for p in pairs]), tokenizer.encode([p[1] for p in pairs])
        kept = [(s, t) for s, t in zip(src, tgt) if max(len(s), len(t)) + 1 <= limit]
        cache = data.TokenCache.from_pairs([s for s, _ in kept], [t for _, t in kept])
        return data.BatchIterator(cache, config.data, num_devices=1, repeat=repeat, shuffle=shuffle,
                                  seed=int(config.data.seed))
    return data.make_batches(config, tokenizer, split, repeat=repeat, shuffle=shuffle, num_devices=1,
                             process_index=0, process_count=1)


def load_tokenizer(ctx: Context):
    from jaxformer.data import Tokenizer

    return Tokenizer.load(ctx.vocab_path)


def one_device_mesh():
    import jax

    from jaxformer import parallel

    return parallel.make_mesh(jax.devices()[:1])


def rms(x) -> float:
    import numpy as np

    x = np.asarray(x, np.float64)
    return float(np.sqrt(np.mean(np.square(x)))) if x.size else 0.0


def is_out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


# ------------------------------------------------------------------------------------------------ data

def part_data(ctx: Context):
    """The vocabulary every other part loads, trained here once (a rerun with the same --work reuses it)."""
    yield from guarded("vocabulary", _vocabulary, ctx)


def _vocabulary(ctx: Context):
    from jaxformer.data import Tokenizer, get_tokenizer

    c = ctx.multi30k_config(vocab=False)
    with open(ctx.data_file("train", "en")) as f:
        pairs = sum(1 for _ in f)
    try:
        import datasets

        have = f"datasets {datasets.__version__}"
    except Exception as e:  # noqa: BLE001
        have = f"not importable: {type(e).__name__}: {e}"
    start = time.monotonic()
    if have.startswith("datasets") or os.path.isfile(ctx.vocab_path):
        tokenizer = get_tokenizer(c, ctx.work)  # the library's path: a sample over the whole train split
    else:
        lines = []
        for lang in ("en", "de"):
            with open(ctx.data_file("train", lang)) as f:
                lines += [line.strip() for line in f]
        tokenizer = Tokenizer.train(lines, int(c.data.vocab_size), ctx.vocab_path)
    yield {"what": "vocabulary", "pieces": tokenizer.vocab_size, "pairs": pairs, "datasets": have,
           "seconds": round(time.monotonic() - start, 1), "note": f"{ctx.data}, configs/multi30k.py's data.vocab_size"}


# ------------------------------------------------------------------------------------------------ env

def part_env(ctx: Context):
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
    """The env part's measured bf16 matmul peak (measured here when that part did not run)."""
    path = os.path.join(ctx.work, "peak.json")
    if os.path.isfile(path):
        with open(path) as f:
            return float(json.load(f)["bf16_flops"])
    import jax.numpy as jnp

    from common import matmul_peak_flops

    return matmul_peak_flops(jnp.bfloat16, 512 if ctx.dry else 8192)


# ------------------------------------------------------------------------------------------------ correctness

def part_correctness(ctx: Context):
    reference = _start_cpu_reference(ctx)  # runs beside everything else here, on the host's cores
    try:
        yield from guarded("logits", _logits_check, ctx)
        yield from guarded("all-PAD rows", _all_pad_check, ctx)
        yield from guarded("train", _train_check, ctx, reference)
        yield from guarded("beam search", _beam_check, ctx)
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()


def training_config(ctx: Context, workdir: str):
    """configs/multi30k.py as it trains, for 200 steps (10 in a dry run), logging the loss every 10 (5)."""
    c = ctx.multi30k_config()
    t = c.train
    t.workdir = workdir
    t.steps = 10 if ctx.dry else 200
    t.log_every = 5 if ctx.dry else 10
    t.eval_every = t.checkpoint_every_steps = t.steps
    t.eval_bleu_sentences = 0
    t.keep_checkpoints = t.average_last = 1
    t.plot = t.progress_bar = False
    if ctx.dry:
        t.warmup_steps = 10
    return c


def _start_cpu_reference(ctx: Context) -> subprocess.Popen:
    """The same training run on the CPU, in a process of its own (8 CPU devices, 2 in a dry run: the batch's 32
    rows, 8 in a dry run, split evenly, so its batches are the device's), on the second half of the cores where
    the machine has 8 or more (the first half compiles for the device)."""
    flags = f"--xla_force_host_platform_device_count={2 if ctx.dry else 8}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               XLA_FLAGS=f"{flags} {DRY_RUN_XLA_FLAGS}" if ctx.dry else flags)
    cmd = [sys.executable, os.path.abspath(__file__), "--part", "cpu_reference", "--data",
           ctx.data, "--work", ctx.work] + (["--dry-run"] if ctx.dry else [])
    log = open(os.path.join(ctx.work, "cpu_reference.log"), "w")
    # In this part's process group, so that the parent's stop at the part's limit ends it too.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) >= 8:  # set while it still imports, before XLA sizes its thread pool
        with contextlib.suppress(OSError):
            os.sched_setaffinity(proc.pid, cores[len(cores) // 2:])
    return proc


def _cpu_reference(ctx: Context) -> int:
    from jaxformer.train import run

    workdir = os.path.join(ctx.work, "train_cpu")
    shutil.rmtree(workdir, ignore_errors=True)
    run(training_config(ctx, workdir))
    return 0


@functools.lru_cache(maxsize=None)
def _logits_fn(cfg):
    import jax

    from jaxformer.model import Transformer

    model = Transformer(cfg)
    return jax.jit(lambda params, b: model.apply(params, b["src"], b["tgt_in"],
                                                 **{k: b[k] for k in OPTIONAL_FIELDS if k in b}))


def _first_batches(ctx: Context, config, split: str = "test"):
    """{"unpacked": ..., "packed": ...}: the first batch of `split` each way (host numpy)."""
    tokenizer = load_tokenizer(ctx)
    out = {}
    for layout, pack in (("unpacked", False), ("packed", True)):
        config.data.pack = pack
        out[layout] = next(iter(batch_iterator(config, tokenizer, split, repeat=False, shuffle=False)))
    return out


def _logits_check(ctx: Context):
    """The same parameters and batch: bf16 logits on the device against float32 logits on the CPU.

    Tolerance: the RMS difference over non-pad target positions must be at most twice the CPU's own bf16 one
    (the CPU computing the same logits in bf16, against its float32), so the device adds no more than bf16
    rounding does. float32 at matmul precision "float32" must agree to a relative RMS of 1e-4; float32 at the
    default precision (which on a GPU may use TF32 matmuls) is reported without a check. A dry run checks the
    unpacked batch at the default precision only (the device is the CPU).
    """
    import jax
    import numpy as np

    from jaxformer.attention import accelerator_platform
    from jaxformer.model import TransformerConfig, init_params

    c = ctx.multi30k_config()
    tokenizer = load_tokenizer(ctx)
    base = TransformerConfig.from_dict(c.model.to_dict(), vocab_size=tokenizer.vocab_size)
    params = init_params(base, jax.random.key(0))
    cpu, device = jax.devices("cpu")[0], jax.devices()[0]
    platform = accelerator_platform()

    def logits(where, batch, precision=None, **overrides):
        cfg = dataclasses.replace(base, **overrides)
        fn = _logits_fn(cfg)
        with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
            return np.asarray(fn(jax.device_put(params, where), jax.device_put(batch, where)))

    for layout, batch in _first_batches(ctx, c).items():
        if ctx.dry and layout == "packed":
            continue
        real = batch["tgt_out"] != 0
        ref32 = logits(cpu, batch, dtype="float32", attention_impl="xla")[real]
        scale = rms(ref32)
        noise = rms(logits(cpu, batch, dtype="bfloat16", attention_impl="xla")[real] - ref32)
        common = {"what": "logits vs CPU float32", "layout": layout, "batch": list(batch["src"].shape),
                  "positions": int(real.sum())}

        def bf16(impl):
            diff = logits(device, batch, dtype="bfloat16", attention_impl=impl)[real] - ref32
            yield {**common, "impl": impl, "dtype": "bfloat16", "metric": "rms diff", "value": rms(diff),
                   "tolerance": 2 * noise, "pass": rms(diff) <= 2 * noise, "max_abs_diff": float(np.abs(diff).max()),
                   "logits_rms": scale, "note": "tolerance: 2 x the CPU's own bf16 rms diff"}

        def float32(precision, check):
            diff = logits(device, batch, precision, dtype="float32", attention_impl="xla")[real] - ref32
            row = {**common, "impl": "xla", "dtype": "float32", "metric": "relative rms diff",
                   "value": rms(diff) / scale, "max_abs_diff": float(np.abs(diff).max()),
                   "note": f"matmul precision {precision or 'default'}"}
            if check:
                row.update(tolerance=1e-4, **{"pass": rms(diff) / scale <= 1e-4})
            yield row

        for impl in applicable_impls(platform):
            yield from guarded(f"logits {layout} {impl} bfloat16", bf16, impl)
        if layout == "unpacked":
            for i, precision in enumerate((None,) if ctx.dry else ("float32", None)):
                yield from guarded(f"logits {layout} float32 precision {precision}", float32, precision, i == 0)


def _all_pad_check(ctx: Context):
    """Evaluation batches with all-PAD rows (as the last batch of a split, and multi-host padding, have) give a
    finite loss over the same tokens with every attention implementation, and a train step on such a batch
    keeps the parameters finite (auto, and cuDNN with lengths). A small model: the hazard is in the masks.
    Each implementation runs in bf16 on both layouts (cuDNN with a dense mask when packed), einsum (bf16) and
    XLA in float32 on the unpacked one; a dry run, XLA float32 on both."""
    import jax

    from jaxformer import parallel
    from jaxformer.attention import accelerator_platform
    from jaxformer.model import TransformerConfig, init_params

    c = ctx.multi30k_config()
    tokenizer = load_tokenizer(ctx)
    small = dict(d_model=64, d_ff=128, num_heads=4, num_encoder_layers=1, num_decoder_layers=1)
    base = TransformerConfig.from_dict({**c.model.to_dict(), **small}, vocab_size=tokenizer.vocab_size)
    params = init_params(base, jax.random.key(0))  # float32 master weights, whatever the compute dtype
    platform = accelerator_platform()
    train_dtype = "bfloat16" if platform == "cuda" else "float32"  # XLA CPU has no bf16 x bf16 -> f32 dot
    combos = [("float32", "xla")] if ctx.dry else (
        [("bfloat16", impl) for impl in applicable_impls(platform)] + [("bfloat16", "einsum"), ("float32", "xla")])
    for layout, batch in _first_batches(ctx, c, "valid").items():
        rows, length = batch["src"].shape
        padded = parallel.pad_batch(batch, rows + 8, length)  # 8 all-PAD rows at the end
        tokens = int((batch["tgt_out"] != 0).sum())
        for dtype, impl in combos:
            if layout == "packed" and (impl == "einsum" or dtype == "float32") and not ctx.dry:
                continue
            cfg = dataclasses.replace(base, dtype=dtype, attention_impl=impl)
            yield from guarded(f"all-PAD rows {layout} {impl} {dtype}", _all_pad_eval, ctx, c.train, cfg, params,
                               layout, padded, tokens)
        train_impls = ["auto"] + (["cudnn"] if platform == "cuda" and layout == "unpacked" else [])
        for impl in train_impls:
            cfg = dataclasses.replace(base, dtype=train_dtype, attention_impl=impl)
            yield from guarded(f"all-PAD rows train {layout} {impl}", _all_pad_train, ctx, c.train, cfg, layout, padded)


def _all_pad_eval(ctx: Context, train_cfg, cfg, params, layout: str, padded, tokens: int):
    from jaxformer import parallel
    from jaxformer.model import Transformer
    from jaxformer.steps import Steps, summarize

    mesh = one_device_mesh()
    mark = len(ctx.attention_log.lines)
    steps = Steps.from_config(Transformer(cfg), train_cfg, mesh)
    result = summarize(steps.evaluate(parallel.replicate(params, mesh), [parallel.shard_batch(padded, mesh)]))
    yield {"what": "eval loss with all-PAD rows", "layout": layout, "impl": cfg.attention_impl, "dtype": cfg.dtype,
           "metric": "loss", "value": result["loss"], "tolerance": "finite, over the real tokens only",
           "pass": math.isfinite(result["loss"]) and result["tokens"] == tokens,
           "attention_log": ctx.attention_log.lines[mark:]}


def _all_pad_train(ctx: Context, train_cfg, cfg, layout: str, padded):
    import numpy as np

    from jaxformer import parallel
    from jaxformer.model import Transformer
    from jaxformer.steps import Steps

    mesh = one_device_mesh()
    steps = Steps.from_config(Transformer(cfg), train_cfg, mesh)
    state, metrics = steps.train(steps.init_state(0), parallel.shard_batch(padded, mesh))
    ok = bool(steps.all_finite(state.params)) and bool(np.isfinite(float(metrics["loss"])))
    yield {"what": "train step with all-PAD rows", "layout": layout, "impl": cfg.attention_impl, "dtype": cfg.dtype,
           "metric": "loss", "value": float(metrics["loss"]) / max(float(metrics["tokens"]), 1.0),
           "tolerance": "finite loss and parameters", "pass": ok}


def _train_check(ctx: Context, reference: subprocess.Popen):
    """200 steps of configs/multi30k.py through `jaxformer.train.run` on the device; the loss must fall by at
    least 1.0 (0.3 in a dry run) from the first logged window to the last and, at every step the CPU run
    beside it has logged, agree with the CPU's to 3% (float32; the GPU's default matmul precision may be TF32)."""
    from jaxformer.train import run

    workdir = os.path.join(ctx.work, "train_gpu")
    shutil.rmtree(workdir, ignore_errors=True)
    mark = len(ctx.attention_log.lines)
    start = time.monotonic()
    result = run(training_config(ctx, workdir))
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
    while reference.poll() is None and ctx.left() > 40 and len(_train_losses(os.path.join(ctx.work, "train_cpu"))) \
            < len(device):
        time.sleep(1.0)
    cpu = _train_losses(os.path.join(ctx.work, "train_cpu"))
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
    from jaxformer.metrics import METRICS_FILE

    out = {}
    path = os.path.join(workdir, METRICS_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                with contextlib.suppress(json.JSONDecodeError):
                    record = json.loads(line)
                    if record.get("split") == "train":
                        out[int(record["step"])] = float(record["loss"])
    return out


def trained_model(ctx: Context):
    """(translator, what): the model `correctness` trained, or the Multi30k shape with random weights."""
    import jax

    from jaxformer import io
    from jaxformer.model import Transformer, TransformerConfig, init_params
    from jaxformer.translate import Translator

    workdir = os.path.join(ctx.work, "train_gpu")
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        with contextlib.suppress(Exception):
            translator = io.load(workdir)
            return translator, f"trained on the device (checkpoint {translator.checkpoint_steps})"
    c = ctx.multi30k_config()
    tokenizer = load_tokenizer(ctx)
    cfg = TransformerConfig.from_dict(c.model.to_dict(), vocab_size=tokenizer.vocab_size)
    return (Translator(Transformer(cfg), init_params(cfg, jax.random.key(0)), tokenizer, c.decode.to_dict()),
            "random weights (no trained run): every hypothesis runs to the length limit")


def _beam_check(ctx: Context):
    """Beam search (beam 4, float32) over 16 test2016 sentences: the device's outputs must equal the CPU's at
    matmul precision "float32"; at the default precision the differing rows are reported (a dry run checks the
    default precision: its device is the CPU)."""
    import jax
    import numpy as np

    from jaxformer import decode
    from jaxformer.data import EOS_ID

    translator, what = trained_model(ctx)
    with open(ctx.data_file("test", "en")) as f:
        sentences = [next(f).strip() for _ in range(16)]
    ids = translator.tokenizer.encode(sentences)
    src = np.zeros((len(ids), max(map(len, ids)) + 1), np.int32)
    for row, seq in enumerate(ids):
        src[row, :len(seq)], src[row, len(seq)] = seq, EOS_ID
    settings = dict(beam_size=4, alpha=float(translator.decode["length_penalty"]),
                    max_extra_len=int(translator.decode["max_extra_len"]))
    cpu, device = jax.devices("cpu")[0], jax.devices()[0]

    def search(where, precision=None):
        params = jax.device_put(translator.params, where)
        with jax.default_device(where), \
                (jax.default_matmul_precision(precision) if precision else contextlib.nullcontext()):
            tokens, scores = decode.beam_search(translator.model, params, jax.device_put(src, where), **settings)
            return np.asarray(tokens), np.asarray(scores)

    ref_tokens, ref_scores = search(cpu)
    for i, precision in enumerate((None,) if ctx.dry else ("float32", None)):
        tokens, scores = search(device, precision)
        differing = int((tokens != ref_tokens).any(axis=1).sum())
        row = {"what": "beam search vs CPU", "impl": "cached decode", "dtype": "float32", "metric": "rows differing",
               "value": differing, "max_score_diff": float(np.abs(scores - ref_scores).max()),
               "sentences": len(sentences), "note": f"matmul precision {precision or 'default'}; {what}"}
        if i == 0:
            row.update(tolerance=0, **{"pass": differing == 0})
        yield row


# ------------------------------------------------------------------------------------------------ speed

def speed_models(ctx: Context) -> dict:
    """{"base": config, "big": config}: configs/wmt14_base.py and wmt14_big.py in bf16 with the brought data
    (float32 on a CPU, whose XLA has no bf16 x bf16 -> float32 products; a dry run: a tiny "base" only)."""
    from jaxformer.attention import accelerator_platform

    out = {}
    for name in ("base",) if ctx.dry else ("base", "big"):
        c = ctx.with_files(load_config(f"wmt14_{name}"))
        c.model.dtype = "bfloat16" if accelerator_platform() != "cpu" else "float32"
        if ctx.dry:
            c.model.update(d_model=32, d_ff=64, num_heads=2, num_encoder_layers=1, num_decoder_layers=1)
            c.data.tokens_per_batch = 1024
            c.data.bucket_lengths = (16, 24, 32, 48, 64)
            c.data.max_len = 64
        out[name] = c
    return out


def speed_batches(ctx: Context, config, pack: bool, count: int) -> tuple[list, float]:
    """`count` train batches (host numpy) of one shape, and the padding efficiency of all the batches drawn.

    Packed batches all have one shape; unpacked ones take the shape (bucket) most batches had among the first
    40 drawn, so that one compile measures the common case."""
    from jaxformer.data import padding_efficiency

    config.data.pack = pack
    iterator = batch_iterator(config, load_tokenizer(ctx), "train", repeat=True, shuffle=True)
    drawn = [next(iterator) for _ in range(count if pack else 40)]
    shapes = [b["src"].shape for b in drawn]
    common = max(set(shapes), key=shapes.count)
    chosen = [b for b in drawn if b["src"].shape == common][:count]
    return chosen, padding_efficiency(drawn)


def pair_lengths(batch) -> tuple:
    """(source lengths, target lengths) of the pairs in a batch, EOS / BOS included, from its PAD / segments."""
    import numpy as np

    if "src_segments" not in batch:
        real = batch["tgt_out"].any(axis=1)
        return (np.count_nonzero(batch["src"], axis=1)[real], np.count_nonzero(batch["tgt_out"], axis=1)[real])
    s, t = [], []
    for src_seg, tgt_seg in zip(batch["src_segments"], batch["tgt_segments"]):
        n = int(max(src_seg.max(), tgt_seg.max()))
        s.append(np.bincount(src_seg, minlength=n + 1)[1:])
        t.append(np.bincount(tgt_seg, minlength=n + 1)[1:])
    return np.concatenate(s), np.concatenate(t)


def useful_train_flops(cfg, batches) -> float:
    """FLOP_FORMULA over the batches' real pairs."""
    from common import transformer_train_flops

    total = 0.0
    for batch in batches:
        s, t = pair_lengths(batch)
        total += float(transformer_train_flops(cfg, 1, s.astype(float), t.astype(float)).sum())
    return total


def step_memory(compiled) -> float | None:
    """GiB the compiled step needs on the device: arguments + outputs - donated + temporaries."""
    with contextlib.suppress(Exception):
        m = compiled.memory_analysis()
        return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                + m.temp_size_in_bytes) / GIB
    return None


def measure_step(ctx: Context, config, batches, *, impl: str, warmup: int, repeats: int) -> dict:
    """Compile the library's train step (`Steps.from_config`, as train.py builds it) for `batches`' shape,
    then time `repeats` steps cycling over them after `warmup` steps."""
    import jax

    from common import transformer_train_flops
    from jaxformer import parallel
    from jaxformer.model import Transformer, TransformerConfig
    from jaxformer.steps import Steps

    cfg = TransformerConfig.from_dict({**config.model.to_dict(), "attention_impl": impl},
                                      vocab_size=int(config.data.vocab_size))
    mesh = one_device_mesh()
    steps = Steps.from_config(Transformer(cfg), config.train, mesh)
    state = steps.init_state(0)
    device_batches = [parallel.shard_batch(b, mesh) for b in batches]
    start = time.perf_counter()
    compiled = steps.train.lower(state, device_batches[0]).compile()
    compile_s = time.perf_counter() - start
    metrics = None
    for i in range(warmup):
        state, metrics = compiled(state, device_batches[i % len(batches)])
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for i in range(repeats):
        state, metrics = compiled(state, device_batches[i % len(batches)])
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / repeats
    used = [batches[i % len(batches)] for i in range(repeats)]
    tokens = sum(int((b["tgt_out"] != 0).sum()) for b in used) / repeats
    rows, length = batches[0]["src"].shape
    return {"cfg": cfg, "compile_s": compile_s, "step_s": seconds, "tgt_tokens": tokens,
            "useful_flops": useful_train_flops(cfg, used) / repeats,
            "slot_flops": transformer_train_flops(cfg, rows, length, length),
            "step_gib": step_memory(compiled), "batch": f"{rows}x{length}",
            "loss_finite": math.isfinite(float(metrics["loss"]))}


def resolved_impl(cfg, pack: bool) -> tuple[str, str]:
    """(implementation, reason): what `choose_attention_impl` makes of cfg.attention_impl in the train step."""
    from jaxformer.attention import accelerator_platform, choose_attention_impl

    return choose_attention_impl(cfg.attention_impl, platform=accelerator_platform(), dtype=cfg.compute_dtype,
                                 head_dim_k=cfg.head_dim_k, head_dim_v=cfg.head_dim_v, structured_mask=not pack,
                                 needs_weights=cfg.attention_dropout_rate > 0)


def part_speed(ctx: Context):
    """Base first, then big; per packing, "auto" first (its choice logged), then the other implementations.

    Unpacked, the timed batches are one bucket's (`speed_batches`); `tgt_tokens_per_s_all_buckets` scales their
    rate by the padding of every bucket's batches against theirs, as if a slot cost the same in every bucket."""
    from jaxformer.attention import accelerator_platform
    from jaxformer.data import padding_efficiency

    peak = bf16_peak(ctx)
    yield {"what": "flop formula", "note": FLOP_FORMULA, "bf16_peak_tflops": peak / 1e12}
    impls = applicable_impls(accelerator_platform())
    count, warmup, repeats = (2, 1, 2) if ctx.dry else (4, 2, 10)
    for name, config in speed_models(ctx).items():
        for pack in (True, False):
            batches, efficiency = speed_batches(ctx, config, pack, count)
            timed_efficiency = padding_efficiency(batches)
            done = set()
            for impl in ["auto"] + impls:
                if impl in done:
                    continue
                if ctx.left() < 20:
                    yield {"what": "train step", "model": name, "pack": pack, "impl": impl,
                           "note": "skipped: the part's time is spent"}
                    continue
                mark = len(ctx.attention_log.lines)

                def one():
                    m = measure_step(ctx, config, batches, impl=impl, warmup=warmup, repeats=repeats)
                    choice = resolved_impl(m["cfg"], pack)
                    done.add(choice[0])
                    rate, flop_rate = m["tgt_tokens"] / m["step_s"], 1.0 / m["step_s"] / peak
                    yield {"what": "train step", "model": name, "pack": pack, "impl": impl, "resolved": choice[0],
                           "dtype": config.model.dtype, "batch": m["batch"], "pad_eff": timed_efficiency,
                           "pad_eff_all_buckets": efficiency, "compile_s": m["compile_s"], "step_ms": 1e3 * m["step_s"],
                           "tgt_tokens_per_s": rate,
                           "tgt_tokens_per_s_all_buckets": rate * efficiency / timed_efficiency,
                           "mfu": m["useful_flops"] * flop_rate, "mfu_slots": m["slot_flops"] * flop_rate,
                           "step_gib": m["step_gib"], "tgt_tokens_per_step": m["tgt_tokens"],
                           "loss_finite": m["loss_finite"], "attention_log": ctx.attention_log.since(mark, choice)}

                yield from guarded(f"train step {name} pack={pack} impl={impl}", one)
                done.add(impl)


# ------------------------------------------------------------------------------------------------ memory

def part_memory(ctx: Context):
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


# ------------------------------------------------------------------------------------------------ decode

def part_decode(ctx: Context):
    """Beam-4 sentences/s over test2016 through `jaxformer.translate.translate_texts` (tokenization and
    detokenization included), once to compile its shapes, then timed; BLEU as a sanity check."""
    yield from guarded("beam-4 decode", _decode_speed, ctx)


def _decode_speed(ctx: Context):
    from jaxformer.evaluate import corpus_bleu
    from jaxformer.model import Transformer
    from jaxformer.translate import translate_texts

    translator, what = trained_model(ctx)
    with open(ctx.data_file("test", "en")) as f_src, open(ctx.data_file("test", "de")) as f_ref:
        sources, references = [line.strip() for line in f_src], [line.strip() for line in f_ref]
    if ctx.dry:
        sources, references = sources[:24], references[:24]
    runs = [("float32", 64), ("float32", 256), ("bfloat16", 256)] if not ctx.dry else [("float32", 32)]
    for dtype, batch_size in runs:
        if ctx.left() < 10:
            yield {"what": "beam-4 decode", "dtype": dtype, "batch_size": batch_size,
                   "note": "skipped: the part's time is spent"}
            continue
        model = Transformer(dataclasses.replace(translator.model.config, dtype=dtype))
        settings = dict(translator.decode, beam_size=4, batch_size=batch_size)
        start = time.perf_counter()
        translate_texts(model, translator.params, translator.tokenizer, sources, settings)
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        hypotheses = translate_texts(model, translator.params, translator.tokenizer, sources, settings)
        seconds = time.perf_counter() - start
        yield {"what": "beam-4 decode", "dtype": dtype, "batch_size": batch_size, "sentences": len(sources),
               "seconds": seconds, "sentences_per_s": len(sources) / seconds, "compile_s": compile_s - seconds,
               "bleu": corpus_bleu(hypotheses, references).score, "params": what,
               "length_penalty": settings["length_penalty"]}


if __name__ == "__main__":
    sys.exit(main())
