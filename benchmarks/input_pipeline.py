"""Input pipeline speed and padding: real tokens/s of the first pass and of cached passes, padding efficiency.

    python benchmarks/input_pipeline.py                    # Multi30k + a generated WMT-like length distribution
    python benchmarks/input_pipeline.py --train-compare    # + the training loop vs its compiled step alone
    python benchmarks/input_pipeline.py --grain            # + the same cache packed by grain (pip install grain)

On Multi30k (`--data`, default ../shared/data/multi30k, train split) with configs/multi30k.py's batching
(data.source=files): "first" is one pass of `make_batches` over an empty token cache (reading the text,
batched tokenization, writing the cache, then batching), "cached" a pass of a fresh iterator over the
filled cache (median of --repeats), both packed (the default) and with data.pack=False. Real tokens are
the non-PAD source + target tokens of the batches; padding efficiency is real tokens / batch slots.
Iterator construction (opening the source) is reported apart, as startup_s. One process, one thread
besides sentencepiece's.

"wmt-like" rows batch --wmt-pairs generated pairs whose lengths look like WMT14 En-De with a 37k BPE
(lognormal, median ~22 tokens, a tail to 256, targets ~5% longer) with configs/wmt14_base.py's batching
(25,000 slots per side, 8 devices): padding efficiency and the number of shapes.

--grain runs the cached, packed pass through grain instead (MapDataset.shuffle -> FirstFitPackIterDataset ->
batch, one Python record per pair), then ours again beside it.

--train-compare trains a small model (d_model 128, 2+2 layers) on Multi30k with `jaxformer.train.run`
(data in a background thread, prefetched) and reports its tokens/s over the last --steps/2 steps beside
the same compiled update run alone on the same batches, already on the device (median of three runs,
one before and two after the loop): the loop's cost over the bare step.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402

from common import report  # noqa: E402
from jaxformer.config import load_recipe  # noqa: E402
from jaxformer.data import (BatchIterator, TokenCache, Tokenizer, make_batches, padding_efficiency,  # noqa: E402
                            sample_sentences)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recipe(name: str):
    return load_recipe(os.path.join(REPO, "configs", f"{name}.py"))


def real_tokens(batches) -> int:
    return sum(int(np.count_nonzero(b["src"])) + int(np.count_nonzero(b["tgt_out"])) for b in batches)


def measure(batches, **row) -> dict:
    """Run `batches` to their end: `row` with the time, real tokens/s, padding efficiency and shape count."""
    start = time.perf_counter()
    batches = list(batches)
    seconds = time.perf_counter() - start
    tokens = real_tokens(batches)
    return {**row, "batches": len(batches), "shapes": len({(b["src"].shape, b["tgt_out"].shape) for b in batches}),
            "real_tokens": tokens, "seconds": seconds, "real_tokens_per_s": tokens / seconds,
            "padding_efficiency": padding_efficiency(batches)}


def one_pass(config, tokenizer, label: str, pack: bool) -> dict:
    config.data.pack = pack
    start = time.perf_counter()
    it = make_batches(config, tokenizer, "train", repeat=False, shuffle=True, num_devices=1, process_index=0,
                      process_count=1)
    startup = time.perf_counter() - start
    row = measure(it, corpus="multi30k", **{"pass": label}, pack=pack, startup_s=startup)
    return {**row, "pairs": len(it.cache)}


def wmt_like(pairs: int, pack: bool, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    src = np.clip(np.round(rng.lognormal(np.log(22), 0.65, pairs)), 1, 400).astype(np.int32)
    tgt = np.clip(np.round(src * rng.lognormal(0.05, 0.2, pairs)), 1, 400).astype(np.int32)
    config = recipe("wmt14_base")
    keep = np.maximum(src, tgt) + 1 <= config.data.max_len
    src, tgt = src[keep], tgt[keep]
    cache = TokenCache(np.full(int(src.sum()), 7, np.int32), src, np.full(int(tgt.sum()), 9, np.int32), tgt)
    config.data.pack = pack
    it = BatchIterator(cache, config.data, repeat=False, shuffle=True, num_devices=8)
    return measure(it, corpus="wmt-like", **{"pass": "cached"}, pack=pack, pairs=len(cache))


def grain_pass(cache: TokenCache, config) -> dict | None:
    """The same cache through grain (shuffle -> first-fit packing -> batch), for comparison; None without grain."""
    try:
        import grain
        import grain.experimental as grain_experimental
    except ImportError:
        print("# grain is not installed (pip install grain): no grain row", flush=True)
        return None

    class Pairs:  # grain's random-access source over the memory-mapped cache
        def __len__(self):
            return len(cache)

        def __getitem__(self, i):
            s = cache.src_tokens[cache.src_offsets[i]:cache.src_offsets[i + 1]]
            t = cache.tgt_tokens[cache.tgt_offsets[i]:cache.tgt_offsets[i + 1]]
            return {"src": np.append(s, 3).astype(np.int32), "tgt_out": np.append(t, 3).astype(np.int32)}

    length = max(config.data.bucket_lengths)
    rows = config.data.tokens_per_batch // length
    ds = grain.MapDataset.source(Pairs()).shuffle(seed=0).to_iter_dataset()
    ds = grain_experimental.FirstFitPackIterDataset(ds, length_struct={"src": length, "tgt_out": length},
                                                     num_packing_bins=rows).batch(rows)
    return measure(ds, corpus="multi30k", **{"pass": "cached-grain"}, pack=True, pairs=len(cache))


def train_compare(config, vocab_path: str, workdir: str, steps: int) -> list[dict]:
    """The loop's tokens/s (train.run) beside the compiled update alone on the same batches."""
    import jax

    from common import time_calls
    from jaxformer import parallel
    from jaxformer.model import Transformer, TransformerConfig
    from jaxformer.steps import Steps
    from jaxformer.train import run

    config.model.update(d_model=128, d_ff=512, num_heads=4, num_encoder_layers=2, num_decoder_layers=2)
    config.data.update(pack=True, vocab_model=vocab_path, tokens_per_batch=2048)
    config.train.update(workdir=workdir, steps=steps, log_every=steps // 2, eval_every=0, eval_bleu_sentences=0,
                        checkpoint_every_steps=0, average_last=1, progress_bar=False, plot=False)
    tokenizer = Tokenizer.load(vocab_path)
    model_cfg = TransformerConfig.from_dict(config.model.to_dict(), vocab_size=tokenizer.vocab_size)
    mesh = parallel.make_mesh()
    step_fns = Steps.from_config(Transformer(model_cfg), config.train, mesh)  # the step the loop runs
    it = make_batches(config, tokenizer, "train", repeat=True, shuffle=True,
                      num_devices=parallel.local_devices_in(mesh))
    host = [next(it) for _ in range(steps)][steps - steps // 2:]  # the batches of the loop's last window
    device = [parallel.shard_batch(b, mesh) for b in host]
    target_tokens = sum(int(np.count_nonzero(b["tgt_out"])) for b in host)
    holder = {"state": step_fns.init_state(0)}

    def isolated():
        for batch in device:
            holder["state"], metrics = step_fns.update(holder["state"], [batch])
        return metrics["loss"]

    alone = [time_calls(isolated, warmup=1, repeats=1)]
    result = run(config)
    alone += [time_calls(isolated, warmup=0, repeats=1) for _ in range(2)]
    print(f"# step alone over the {len(host)} batches: {alone[0]:.2f}s before the loop, "
          f"{alone[1]:.2f}s and {alone[2]:.2f}s after; the loop's last {len(host)} steps: "
          f"{target_tokens / float(result['train_tokens_per_sec']):.2f}s", flush=True)
    alone_rate = target_tokens / float(np.median(alone))
    loop_rate = float(result["train_tokens_per_sec"])
    return [{"corpus": "multi30k", "pass": "train-loop", "pack": True, "steps": steps // 2,
             "seconds_per_step": target_tokens / loop_rate / len(host), "target_tokens_per_s": loop_rate,
             "devices": len(jax.devices())},
            {"corpus": "multi30k", "pass": "step-alone", "pack": True, "steps": steps // 2,
             "seconds_per_step": float(np.median(alone)) / len(host), "target_tokens_per_s": alone_rate,
             "loop_over_alone": loop_rate / alone_rate}]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data", "multi30k"))
    parser.add_argument("--repeats", type=int, default=3, help="cached passes timed (the median is printed)")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--wmt-pairs", type=int, default=200_000)
    parser.add_argument("--train-compare", action="store_true")
    parser.add_argument("--grain", action="store_true", help="also pack the cache with grain, for comparison")
    parser.add_argument("--steps", type=int, default=40, help="with --train-compare: loop steps (timed: the last half)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="input_pipeline-") as tmp:
        config = recipe("multi30k")
        config.data.update(source="files", train_files=os.path.join(args.data, "train"),
                           valid_files=os.path.join(args.data, "val"), vocab_size=args.vocab_size,
                           cache_dir=os.path.join(tmp, "cache"))
        config.train.workdir = os.path.join(tmp, "run")
        start = time.perf_counter()
        tokenizer = Tokenizer.train(sample_sentences(config.data, config.data.vocab_sample_size), args.vocab_size,
                                    os.path.join(tmp, "vocab.model"))
        print(f"# vocabulary: {tokenizer.vocab_size} pieces in {time.perf_counter() - start:.1f}s; "
              f"cpus: {os.cpu_count()}", flush=True)
        rows = [one_pass(config, tokenizer, "first", pack=True)]
        for pack in (True, False):
            runs = [one_pass(config, tokenizer, "cached", pack) for _ in range(args.repeats)]
            rows.append(sorted(runs, key=lambda r: r["real_tokens_per_s"])[len(runs) // 2])
        if args.grain:
            config.data.pack = True
            it = make_batches(config, tokenizer, "train", repeat=False, shuffle=True, process_index=0,
                              process_count=1)
            rows += [row for row in [grain_pass(it.cache, config)] if row]
            rows.append(one_pass(config, tokenizer, "cached", True))  # beside it, under the same load
        rows += [wmt_like(args.wmt_pairs, pack) for pack in (True, False)]
        if args.train_compare:
            rows += train_compare(config, tokenizer.path, os.path.join(tmp, "train"), args.steps)
    report(rows, ["corpus", "pass", "pack", "pairs", "batches", "shapes", "real_tokens_per_s", "padding_efficiency",
                  "seconds", "startup_s", "seconds_per_step", "target_tokens_per_s", "loop_over_alone"])


if __name__ == "__main__":
    main()
