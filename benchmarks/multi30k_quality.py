"""Quality on real data: train configs/multi30k.py on the local Multi30k files, then score test2016.

    python benchmarks/multi30k_quality.py                      # full recipe (about an hour on 2 CPU cores)
    python benchmarks/multi30k_quality.py --steps 200          # a quick look
    python benchmarks/multi30k_quality.py --skip-training      # only re-score an existing run
    python benchmarks/multi30k_quality.py --skip-training --split valid --set decode.beam_size=5
    python benchmarks/multi30k_quality.py --minutes 44.4   # a wall-clock budget (see below)

--minutes M is train.stop_after_minutes: training stops once M minutes of wall-clock are spent (start-up and
validations included), validating and saving the step it is in, and scoring goes on with that run. The
minutes count over resumes (checkpoints record them), so a run stopped early is finished by the same command
with the same --workdir, and a rerun of a spent budget only scores. The issue's budgets
are minutes on a machine where PyTorch's small step (`python benchmarks/train_vs_pytorch.py --shapes small`)
takes 1.4 s; on another machine, scale them by its PyTorch step time / 1.4 s.

Prints, as JSON lines and a table: training wall-clock time, steps and seconds per step (wall-clock over
the steps this run made, start-up included), and cased sacreBLEU with, beside it, lowercased sacreBLEU
(each with its signature) on the whole Multi30k val and test2016 En->De sets for the run's averaged last
`train.average_last` checkpoints, with the config's beam search (beam 4 / alpha 0.6, the paper's) and
with greedy search. Choose settings on val; test2016 is
for reporting. Hypotheses and scores are also written to <workdir>/eval_<split>_*.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from common import device_summary, report  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "multi30k"))
    parser.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data", "multi30k"),
                        help="folder with train/val/test2016 .en/.de")
    parser.add_argument("--steps", type=int, default=None, help="override train.steps")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--minutes", type=float, default=None,
                        help="stop training after this many minutes of wall-clock, over resumes "
                             "(train.stop_after_minutes; it validates and saves the step it is in)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set model.d_model=128 (repeatable)")
    parser.add_argument("--eval-limit", type=int, default=None, help="score only the first N sentences of each split")
    parser.add_argument("--split", action="append", choices=("valid", "test"), default=None,
                        help="which sets to score (repeatable; default: valid and test)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname).1s %(name)s] %(message)s")
    logging.getLogger("jaxformer").setLevel(logging.INFO)

    sys.path.insert(0, os.path.join(REPO, "configs"))
    import multi30k  # noqa: E402  (configs/multi30k.py)

    from jaxformer import checkpoint as ckpt
    from jaxformer import parallel
    from jaxformer.cli import parse_overrides
    from jaxformer.evaluate import run_evaluation
    from jaxformer.preemption import Preempted
    from jaxformer.train import run

    config = multi30k.get_config()
    config.data.source = "files"
    config.data.train_files = os.path.join(args.data, "train")
    config.data.valid_files = os.path.join(args.data, "val")
    config.data.test_files = os.path.join(args.data, "test2016")
    config.train.workdir = args.workdir
    config.train.progress_bar = False
    if args.steps is not None:
        config.train.steps = args.steps
    for item in args.set:  # typed and checked like `jaxformer evaluate --data.KEY=VALUE`
        section = item.partition(".")[0]
        if section not in config:
            parser.error(f"--set {item}: unknown config section {section!r}")
        config[section].update(parse_overrides([f"--{item}"], section, config[section].to_dict()))

    if config.train.cpu_data_parallel and not args.skip_training:
        parallel.use_every_cpu_core()  # before device_summary() starts JAX's backends; run() would be too late
    print(f"# device: {device_summary()}")
    rows = []
    if not args.skip_training:
        checkpoints = os.path.join(args.workdir, ckpt.CHECKPOINT_DIR)
        first_step = max(ckpt.CheckpointStore(checkpoints, read_only=True).steps, default=0) \
            if os.path.isdir(checkpoints) else 0  # a resumed run times only its own steps
        start = time.time()
        if args.minutes is not None:
            config.train.stop_after_minutes = args.minutes
        try:
            result = run(config)
        except Preempted as stopped:  # SIGTERM / Ctrl-C: the loop saved the step it was in
            print(f"# {stopped}")
            result = {"step": stopped.step}
        minutes = (time.time() - start) / 60
        rows.append({"what": "train", "steps": result["step"], "minutes": minutes,
                     "s_per_step": 60 * minutes / max(result["step"] - first_step, 1),
                     "valid_bleu_sample": result.get("valid_avg_bleu", result.get("valid_bleu")),
                     "valid_ppl": result.get("valid_avg_ppl", result.get("valid_ppl"))})
    # the config's search (with any --set decode.KEY), and greedy
    searches = {f"beam{config.decode.beam_size}": config.decode.to_dict(), "greedy": {"beam_size": 1}}
    for split, (name, decode) in itertools.product(args.split or ("valid", "test"), searches.items()):
        out = os.path.join(args.workdir, f"eval_{split}_{name}")
        bleu = run_evaluation(args.workdir, out, split=split,  # averages the run's last train.average_last
                              decode_overrides=decode, limit=args.eval_limit)
        info = json.loads(open(os.path.join(out, "bleu.json")).read())
        rows.append({"what": f"{'test2016' if split == 'test' else 'val'} {name}",
                     "average_last": info["average_last"], "bleu": bleu.score,
                     "bleu_lc": bleu.lowercased.score, "signature": bleu.signature,
                     "signature_lc": bleu.lowercased.signature, "sentences": bleu.num_sentences,
                     "checkpoint_steps": info["checkpoint_steps"]})
    report(rows, ["what", "steps", "minutes", "s_per_step", "average_last", "bleu", "bleu_lc", "valid_ppl",
                  "signature", "signature_lc"])


if __name__ == "__main__":
    main()
