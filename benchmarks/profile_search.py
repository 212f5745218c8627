"""Where our search spends its time, by part: a jax.profiler trace read with xprof, each XLA op named by XLA's
optimized HLO (issue 39's "Where the time goes").

    python benchmarks/profile_search.py                                   # multi30k_tok, beam 4, 512 sentences
    python benchmarks/profile_search.py --model number_words              # 1,000 number phrases (search_ab.py's)
    python benchmarks/profile_search.py --beam 1 --keep /tmp/profile      # greedy; keep the trace and HLO dump

Runs `jaxformer.load(model).translate(sentences, beam_size=B, batch_size=64)` once untimed, then once under
`jax.profiler.trace`, on --devices JAX CPU devices (default 1, as in the issue's table). XLA_FLAGS (set here,
before JAX starts) dump the search programs' optimized HLO as text (`--xla_dump_to`).

Per-op times: xprof's op_profile / framework_op_stats hold no per-op rows on the CPU backend (xprof 2.24), so
the script asks xprof for the trace viewer's events of the xplane (`xspace_to_tool_data(..., "trace_viewer")`,
no TensorFlow; without xprof it reads jax's `*.trace.json.gz`, the same events). Every event with an `hlo_op`
is one run of one XLA thunk; its duration is its self time, except for control flow (while, conditional,
call), whose events span their bodies and are left out. Times are thread times: they add over threads. Each
run (run_id) of a program is matched to the dumped module of that name that holds the most of its op names
(the header counts ties). Columns: ms and share of all op time, in_loop (the part's share inside the loop),
ops (distinct HLO instructions, over all programs) and runs (their executions).

Parts, from each HLO instruction's metadata: its op_name (JAX's name stack, Flax module paths included) and
its stack_frame_id, resolved through the dump's StackFrames into the Python call stack; an instruction without
metadata (XLA's own copies) takes its first operand's. First rule that holds:
  encoder          op_name under "Transformer.encode" or decode.py _encode in the stack (runs once a batch)
  top-k            the stack has ops.py block_top_k (the K*V beam candidates) or first_argmax (greedy)
  self-attention   decode_cache self_attention_step / _beam_self_attention_step (scores, own-slot select,
                   softmax, weights x values, cache writes), reorder_beams, grow_cache, beam_search_cache,
                   or op_name under ".../self_attention/" (the q/k/v/out projections)
  cross-attention  decode_cache cross_attention_step, or op_name under ".../cross_attention/"
  FFN              op_name under ".../ffn/"
  output projection  ops.output_logits or op_name under "output_projection" (the [rows, D] x [D, V] dot)
  vocab passes     decode_masks search_log_probs, masked_logits, force_eos, force_prefix, constrain, or a line
                   that builds `candidates =` or adds final_logits_bias: log-softmax, masks, candidate sums
  everything else  the rest (layer norms and residuals, embeddings, select's bookkeeping: the small top-ks
                   of finished and live hypotheses, gathers of sequences, the stopping rule)
"Inside the loop": instructions in a while body or condition, or in what they call; outside it: the encoder,
the first step on B rows, the beam cache setup and the cache growth between search segments. The header gives
the most thunks (instructions other than parameter, get-tuple-element, tuple, constant, bitcast) of a while
body; "everything else" is broken down by the innermost jaxformer function and line of its biggest ops.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import linecache
import os
import re
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

PARTS = ["encoder", "top-k", "self-attention", "cross-attention", "output projection", "vocab passes", "FFN",
         "everything else"]
SELF = {"self_attention_step", "_beam_self_attention_step", "reorder_beams.<locals>.gather", "reorder_beams",
        "grow_cache", "grow_cache.<locals>.convert", "grow_cache.<locals>.pad", "beam_search_cache",
        "beam_search_cache.<locals>.convert"}
VOCAB = {"search_log_probs", "masked_logits", "force_eos", "force_prefix", "constrain"}
CONTROL = {"while", "conditional", "call"}
COLUMNS = ["part", "ms", "share", "in_loop", "ops", "runs"]


def part_of(op_name: str, stack: list[tuple[str, str, int]]) -> str:
    """The part of one HLO instruction (the docstring's rules); stack is innermost first."""
    funcs = {func for _, func, _ in stack}
    mine = [(path, func, line) for path, func, line in stack if "/jaxformer/" in path]
    text = linecache.getline(mine[0][0], mine[0][2]) if mine else ""
    if "Transformer.encode" in op_name or "_encode" in funcs:
        return "encoder"
    if funcs & {"block_top_k", "first_argmax"}:
        return "top-k"
    if funcs & SELF or "/self_attention/" in op_name:
        return "self-attention"
    if "cross_attention_step" in funcs or "/cross_attention/" in op_name:
        return "cross-attention"
    if "/ffn/" in op_name:
        return "FFN"
    if "output_logits" in funcs or "output_projection" in op_name:
        return "output projection"
    if funcs & VOCAB or re.search(r"candidates = |final_logits_bias", text):
        return "vocab passes"
    return "everything else"


def read_module(path: str) -> tuple[str, dict, int]:
    """(module name, {instruction: [opcode, shape, op_name, stack, in_loop]}, the most thunks of a while body)
    of an optimized HLO text dump."""
    text = open(path).read()
    name = re.match(r"HloModule (\S+?),", text).group(1)
    table = {}
    for section in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
        found = re.search(rf"^{section}\n(.*?)(?:\n\n|\Z)", text, re.S | re.M)
        rows = found.group(1).splitlines() if found else []
        table[section] = {int(row.split(" ", 1)[0]): row.split(" ", 1)[1] for row in rows}
    fields = lambda s: {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", s)}  # noqa: E731
    locations = {i: fields(s) for i, s in table["FileLocations"].items()}
    frames = {i: fields(s) for i, s in table["StackFrames"].items()}

    def stack(frame: int) -> list[tuple[str, str, int]]:
        out = []  # the dump's parent_frame_id is the parent's id + 1 (0: none), as found in jax 0.10's dumps
        while frame in frames and len(out) < 100:
            loc = locations[frames[frame]["file_location_id"]]
            out.append((table["FileNames"][loc["file_name_id"]].strip('"'),
                        table["FunctionNames"][loc["function_name_id"]].strip('"'), loc["line"]))
            frame = frames[frame]["parent_frame_id"] - 1
        return out

    instructions, calls, computation, loop_roots = {}, collections.defaultdict(set), None, set()
    thunks = collections.Counter()  # per computation: instructions that are not plumbing
    for line in text.splitlines():
        header = re.match(r"(?:ENTRY )?%([\w.\-]+) \(", line)
        if header:
            computation = header.group(1)
            continue
        op = re.match(r"\s+(?:ROOT )?%([\w.\-]+) = (.+?) ([\w\-]+)\(", line)
        if not op:
            continue
        callees = re.findall(r"(?:calls|to_apply|body|condition|true_computation|false_computation)=%([\w.\-]+)",
                             line)
        for group in re.findall(r"(?:branch_computations|called_computations)=\{([^}]*)\}", line):
            callees += re.findall(r"%([\w.\-]+)", group)
        calls[computation].update(callees)
        thunks[computation] += op.group(3) not in ("parameter", "get-tuple-element", "tuple", "constant", "bitcast")
        if op.group(3) == "while":
            loop_roots.update(re.findall(r"(?:body|condition)=%([\w.\-]+)", line))
        op_name = re.search(r'op_name="([^"]*)"', line)
        frame = re.search(r"stack_frame_id=(\d+)", line)
        source = re.search(r'source_file="([^"]*)" source_line=(\d+)', line)
        where = stack(int(frame.group(1))) if frame else [(source.group(1), "", int(source.group(2)))] if source else []
        operand = re.match(r"[^%)]*%([\w.\-]+)", line[op.end():])
        instructions[op.group(1)] = [op.group(3), op.group(2), op_name.group(1) if op_name else "", where, computation,
                                     operand.group(1) if operand else None]
    in_loop, todo = set(), list(loop_roots)
    while todo:
        comp = todo.pop()
        if comp not in in_loop:
            in_loop.add(comp)
            todo += calls[comp]
    for info in instructions.values():
        info[4] = info[4] in in_loop
        source = instructions.get(info.pop())
        if not info[2] and not info[3] and source:  # XLA's copies: their operand's metadata
            info[2], info[3] = source[2], source[3]
    bodies = set(re.findall(r"body=%([\w.\-]+)", text))
    return name, instructions, max((thunks[b] for b in bodies), default=0)


def trace_events(trace_dir: str) -> tuple[list[dict], str]:
    """The trace's XLA op events (with args.hlo_op), through xprof when it is installed."""
    try:
        from xprof.convert import raw_to_tool_data
        xplanes = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
        data, _ = raw_to_tool_data.xspace_to_tool_data(xplanes, "trace_viewer", {})
        events, source = json.loads(data)["traceEvents"], "xprof trace_viewer of the xplane"
    except ImportError:
        path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
        events, source = json.load(gzip.open(path))["traceEvents"], "jax's trace.json.gz (xprof not installed)"
    return [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})], source


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="multi30k_tok", choices=["multi30k_tok", "number_words"])
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--limit", type=int, default=None,
                        help="sentences (default 512 of test2016 for multi30k_tok, 1,000 phrases for number_words)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--devices", type=int, default=1, help="JAX CPU devices (default 1)")
    parser.add_argument("--keep", default=None, metavar="DIR", help="keep the trace and the HLO dump here")
    parser.add_argument("--top", type=int, default=8, help="lines of the --detail breakdown")
    parser.add_argument("--detail", default="everything else", choices=PARTS,
                        help="the part broken down by source line, op and shape (default: everything else)")
    args = parser.parse_args(argv)
    work = args.keep or tempfile.mkdtemp(prefix="profile_search-")
    dump = os.path.join(work, "hlo")
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), f"--xla_dump_to={dump}",
                                        "--xla_dump_hlo_as_text", "--xla_dump_hlo_module_re=_beam|_greedy",
                                        f"--xla_force_host_platform_device_count={args.devices}"]).strip()
    import jax

    import jaxformer
    from common import device_summary, report
    from search_ab import SHARED, model_sets

    limit = args.limit or (512 if args.model == "multi30k_tok" else 1000)
    sentences = model_sets(limit)[args.model]
    translator = jaxformer.load(SHARED / "models" / args.model)
    go = lambda: translator.translate(sentences, beam_size=args.beam, batch_size=args.batch_size)  # noqa: E731
    go()  # compiles, and warms up
    trace_dir = os.path.join(work, "trace")
    with jax.profiler.trace(trace_dir):
        start = time.perf_counter()
        go()
        seconds = time.perf_counter() - start
    events, source = trace_events(trace_dir)
    modules, body = collections.defaultdict(list), 0
    for path in glob.glob(os.path.join(dump, "*after_optimizations.txt")):
        name, instructions, thunks = read_module(path)
        modules[name].append(instructions)
        body = max(body, thunks)
    runs = collections.defaultdict(list)
    for e in events:
        runs[(e["args"].get("hlo_module"), e["args"].get("run_id"))].append(e)

    time_of, runs_of, loop_of = (collections.Counter() for _ in range(3))
    seen, other, ambiguous = collections.defaultdict(set), collections.Counter(), 0
    for (module, _), run in runs.items():
        names = {e["args"]["hlo_op"] for e in run}
        cover = sorted((len(names & m.keys()), i) for i, m in enumerate(modules.get(module, [{}])))
        best = modules[module][cover[-1][1]] if module in modules else {}
        ambiguous += len(cover) > 1 and cover[-2][0] == cover[-1][0]
        for e in run:
            opcode, shape, op_name, stack, in_loop = best.get(e["args"]["hlo_op"], ("?", "", "", [], False))
            if opcode in CONTROL:
                continue
            part = part_of(op_name, stack) if module in modules else "everything else"
            time_of[part] += e["dur"]
            runs_of[part] += 1
            loop_of[part] += e["dur"] if in_loop else 0
            seen[part].add((module, e["args"]["hlo_op"]))
            if part == args.detail:
                mine = [f"{os.path.basename(p)}:{line} {func}" for p, func, line in stack if "/jaxformer/" in p]
                what = mine[0] if mine else op_name[-60:] or "no metadata"
                other[f"{what} ({opcode} {shape.split('{')[0]})"] += e["dur"]
    total = sum(time_of.values()) or 1.0
    rows = [{"part": part, "ms": time_of[part] / 1e3, "share": time_of[part] / total,
             "in_loop": loop_of[part] / (time_of[part] or 1.0), "ops": len(seen[part]), "runs": runs_of[part],
             "model": args.model, "beam": args.beam, "sentences": len(sentences)} for part in PARTS]
    inside = sum(loop_of.values())
    rows += [{"part": "(inside the loop)", "ms": inside / 1e3, "share": inside / total},
             {"part": "(outside the loop)", "ms": (total - inside) / 1e3, "share": 1 - inside / total},
             {"part": "(all ops)", "ms": total / 1e3, "share": 1.0, "ops": sum(len(s) for s in seen.values()),
              "runs": sum(runs_of.values())}]
    print(f"# {device_summary()}; {args.model}, beam {args.beam}, {len(sentences)} sentences, batch "
          f"{args.batch_size}; traced pass {seconds:.2f} s ({len(sentences) / seconds:.0f} sent/s under the "
          f"profiler); op times from {source}; {len(runs)} program runs; {sum(map(len, modules.values()))} "
          f"search programs dumped, {ambiguous} runs matched ambiguously; a loop body of {body} thunks at most"
          + (f"; kept in {args.keep}" if args.keep else ""))
    report(rows, COLUMNS)
    print(f"\n# {args.detail}, biggest (ms, share of all ops):")
    for what, micros in other.most_common(args.top):
        print(f"{micros / 1e3:9.1f}  {micros / total:5.1%}  {what}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
