"""Decoding speed: sentences/s of greedy and beam-4 search over Multi30k test2016 with a trained model.

    python benchmarks/decode_speed.py --model runs/multi30k          # a training workdir or an export dir
    python benchmarks/decode_speed.py --model runs/multi30k --limit 200 --batch-size 32

Each search runs once over the sentences to compile its shapes, then is timed over the same sentences
(median of --repeats passes). Tokenization and detokenization are inside the timing: this is what
`jaxformer translate` costs per sentence once compiled.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from common import device_summary, report  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=os.path.join(REPO, "runs", "multi30k"))
    parser.add_argument("--average-last", type=int, default=None,
                        help="default: the run's train.average_last")
    parser.add_argument("--source", default=os.path.join(REPO, "..", "shared", "data", "multi30k", "test2016.en"))
    parser.add_argument("--limit", type=int, default=None, help="first N sentences only")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)

    from jaxformer.evaluate import read_lines
    from jaxformer.translate import load_translator

    translator = load_translator(args.model, average_last=args.average_last)
    sentences = read_lines(args.source)[: args.limit]
    print(f"# device: {device_summary()}; {len(sentences)} sentences from {args.source}")
    rows = []
    for name, beam in (("greedy", 1), ("beam4", 4)):
        translator.translate(sentences, beam_size=beam, batch_size=args.batch_size)  # compile every shape
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            translator.translate(sentences, beam_size=beam, batch_size=args.batch_size)
            times.append(time.perf_counter() - start)
        seconds = sorted(times)[len(times) // 2]
        rows.append({"search": name, "beam_size": beam, "batch_size": args.batch_size,
                     "sentences": len(sentences), "seconds": seconds, "sentences_per_s": len(sentences) / seconds})
    report(rows, ["search", "beam_size", "batch_size", "sentences", "seconds", "sentences_per_s"])


if __name__ == "__main__":
    main()
