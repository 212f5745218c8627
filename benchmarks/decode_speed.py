"""Decoding speed: sentences/s of greedy and beam-4 search.

    python benchmarks/decode_speed.py --random --compare REV   # random Multi30k-size model, beside commit REV's search
    python benchmarks/decode_speed.py --model runs/multi30k          # a training workdir or an export dir
    python benchmarks/decode_speed.py --model runs/multi30k --limit 200 --batch-size 32

--random: the Multi30k model shape (configs/multi30k.py: d_model 256, 3+3 layers, 4 heads, d_ff 1024,
vocab 8000) with random weights, --sentences random sources of --src-tokens tokens (+ EOS) in one batch,
outputs capped at --max-len tokens (EOS included). A random model never chooses EOS, so every hypothesis
runs to the cap: the search's worst case, and no early stopping. Only the compiled search is timed.
--compare REV also times the search of git commit REV (`at_commit.package_at`; e.g. 5ddbeec, the last
commit before model.py was split), on the same devices, interleaved with the current one (repeat by repeat),
checks that both return the same tokens and prints the ratio. Both get the same parameters: the model of
that commit always had attention biases, so the current one is built with model.attention_bias=True.

On a CPU, every core is a JAX device (`parallel.use_every_cpu_core()`, as `jaxformer translate` and
`evaluate` do) and the current search splits the batch over them ("current"); "current_one_device" is the
same search on one device, and the baseline runs on one device as it did. --one-device skips the split.

--model: a trained model over test2016; each search runs once to compile its shapes, then is timed over
the same sentences (median of --repeats passes), tokenization and detokenization included (what
`jaxformer translate` costs per sentence once compiled).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from common import device_summary, report  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ["search", "impl", "beam_size", "batch_size", "sentences", "seconds", "sentences_per_s",
           "speedup", "same_tokens", "rows_differing"]


def random_mode(args) -> list[dict]:
    import jax
    import numpy as np

    from jaxformer import decode, parallel
    from jaxformer.data import EOS_ID
    from jaxformer.model import TransformerConfig, init_params

    cfg = TransformerConfig(vocab_size=8000, d_model=256, d_ff=1024, num_heads=4, num_encoder_layers=3,
                            num_decoder_layers=3, max_len=128, dropout_rate=0.0, attention_bias=bool(args.compare))
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    src = np.zeros((args.sentences, args.src_tokens + 1), np.int32)
    src[:, :-1] = rng.integers(4, cfg.vocab_size, (args.sentences, args.src_tokens))
    src[:, -1] = EOS_ID
    mesh = parallel.local_mesh()
    inputs = {"one": (jax.device_put(params, jax.devices()[0]), jax.device_put(src, jax.devices()[0]))}
    impls = {"current": (decode, cfg, "one")}
    if mesh is not None and len(src) % mesh.devices.size == 0:  # the batch split over the CPU's cores
        inputs["split"] = (parallel.replicate(params, mesh), jax.device_put(src, parallel.batch_sharded(mesh)))
        impls = {"current": (decode, cfg, "split"), "current_one_device": (decode, cfg, "one")}
    if args.compare:  # the old search over the old model module (same parameters)
        from at_commit import package_at

        old = package_at(args.compare)
        known = {f.name for f in __import__("dataclasses").fields(old.model.TransformerConfig)}
        old_cfg = old.model.TransformerConfig(**{k: v for k, v in cfg.to_dict().items() if k in known})
        impls["baseline"] = (old.decode, old_cfg, "split" if "split" in inputs else "one")
    rows = []
    for name, beam in (("greedy", 1), ("beam4", 4)):
        runs = {}
        for impl, (module, config, where) in impls.items():
            p, s = inputs[where]
            if beam == 1:
                runs[impl] = lambda m=module, c=config, p=p, s=s: m.greedy_search(c, p, s, max_len=args.max_len)
            else:
                runs[impl] = lambda m=module, c=config, p=p, s=s: m.beam_search(c, p, s, beam_size=beam,
                                                                                max_len=args.max_len)[0]
        outputs = {impl: np.asarray(jax.block_until_ready(run())) for impl, run in runs.items()}  # compile
        if beam > 1:  # the scores too, to say how far apart the two searches' numbers are
            scores = {impl: np.asarray(module.beam_search(config, *inputs[where], beam_size=beam,
                                                          max_len=args.max_len)[1])
                      for impl, (module, config, where) in impls.items()}
        times = {impl: [] for impl in runs}
        for _ in range(args.repeats):
            for impl, run in runs.items():
                start = time.perf_counter()
                jax.block_until_ready(run())
                times[impl].append(time.perf_counter() - start)
        medians = {impl: sorted(t)[len(t) // 2] for impl, t in times.items()}
        for impl in runs:
            row = {"search": name, "impl": impl, "beam_size": beam, "batch_size": args.sentences,
                   "sentences": args.sentences, "src_tokens": args.src_tokens, "max_len": args.max_len,
                   "seconds": medians[impl], "seconds_all": times[impl],
                   "sentences_per_s": args.sentences / medians[impl]}
            if impl.startswith("current") and "baseline" in runs:
                ratios = sorted(b / c for b, c in zip(times["baseline"], times[impl]))
                row["speedup"] = ratios[len(ratios) // 2]  # median of the per-repeat ratios
                row["speedup_range"] = [ratios[0], ratios[-1]]
                row["same_tokens"] = bool(np.array_equal(outputs[impl], outputs["baseline"]))
                row["rows_differing"] = int((outputs[impl] != outputs["baseline"]).any(axis=1).sum())
                if beam > 1:
                    row["max_score_diff"] = float(np.max(np.abs(scores[impl] - scores["baseline"])))
            rows.append(row)
    return rows


def model_mode(args) -> list[dict]:
    from jaxformer.evaluate import read_lines
    import jaxformer

    translator = jaxformer.load(args.model, average_last=args.average_last)
    sentences = read_lines(args.source)[: args.limit]
    print(f"# {len(sentences)} sentences from {args.source}")
    rows = []
    for name, beam in (("greedy", 1), ("beam4", 4)):
        translator.translate(sentences, beam_size=beam, batch_size=args.batch_size)  # compile every shape
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            translator.translate(sentences, beam_size=beam, batch_size=args.batch_size)
            times.append(time.perf_counter() - start)
        seconds = sorted(times)[len(times) // 2]
        rows.append({"search": name, "impl": "current", "beam_size": beam, "batch_size": args.batch_size,
                     "sentences": len(sentences), "seconds": seconds, "sentences_per_s": len(sentences) / seconds})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--random", action="store_true", help="a random-weight Multi30k-size model (see above)")
    parser.add_argument("--compare", default=None, metavar="REV",
                        help="--random: also time the search of git commit REV (e.g. 5ddbeec)")
    parser.add_argument("--sentences", type=int, default=64, help="--random: batch of random sources")
    parser.add_argument("--src-tokens", type=int, default=20, help="--random: source tokens (+ EOS)")
    parser.add_argument("--max-len", type=int, default=40, help="--random: output cap, EOS included")
    parser.add_argument("--model", default=os.path.join(REPO, "runs", "multi30k"))
    parser.add_argument("--average-last", type=int, default=None,
                        help="default: the run's train.average_last")
    parser.add_argument("--source", default=os.path.join(REPO, "..", "shared", "data", "multi30k", "test2016.en"))
    parser.add_argument("--limit", type=int, default=None, help="first N sentences only")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=None, help="default: 5 with --random, else 1")
    parser.add_argument("--one-device", action="store_true", help="do not split the batch over the CPU's cores")
    args = parser.parse_args(argv)
    if not args.one_device:
        from jaxformer import parallel
        parallel.use_every_cpu_core()
    if args.repeats is None:
        args.repeats = 5 if args.random else 1
    print(f"# device: {device_summary()}")
    rows = random_mode(args) if args.random else model_mode(args)
    report(rows, COLUMNS)


if __name__ == "__main__":
    main()
