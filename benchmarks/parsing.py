"""The parsing benchmark (the paper's §6.3) on the shared Penn Treebank sample: our parser beside the
right-branching baseline and a trained peer, SuPar's CRF constituency parser, in one run on one machine.

    python benchmarks/parsing.py --model runs/ptb_parse                 # test split; trains SuPar (~2 hours)
    python benchmarks/parsing.py --model runs/ptb_parse --peer-model W/supar.crf_con.model   # reuse SuPar
    python benchmarks/parsing.py --model runs/ptb_parse --peer-only --work-dir W   # SuPar alone, into W
    python benchmarks/parsing.py --model runs/ptb_parse --split dev --beam-size 4 --no-peer

The sample (../shared/data/ptb_sample, read by jaxformer.data.treebank) split by file: train wsj_0001-0139,
dev 0140-0159, test 0160-0179; trees normalized as for training. Every engine is scored by our scorer,
`jaxformer.parseval` (EVALB's COLLINS.prm), against the same gold trees (--split, default test):
  jaxformer grammar        --model (a `train.py --config configs/ptb_parse.py` workdir or an export; the
                           run's averaged checkpoints unless --step/--average-last/--best say otherwise),
                           `jaxformer.parsing.parse_words` under the grammar mask, with the run's decode
                           settings unless --beam-size/--alpha/... say otherwise (`jaxformer parse`'s call)
  jaxformer no-grammar     the same search without the mask; ill-formed outputs are counted, then repaired
                           by `jaxformer.parsing.repair` and scored (`jaxformer parse --no-grammar`)
  right-branching          each sentence's right-branching tree over its gold tags, every constituent
                           labeled S (benchmarks/README.md, "Parsing: the scorer against EVALB": F1 8.92 on test)
  supar crf_con            SuPar 1.1.4's CRF constituency parser (BiLSTM, char features, no pretrained
                           embeddings), trained here on the train split (dev for its model choice) through
                           `python -m supar.cmds.crf_con train`, unless --peer-model names a trained one;
                           it predicts over the gold trees' words and tags (`predict`), so its tags are the gold
                           ones. --no-peer skips it.
Rows: F1 on all sentences and on those of <= 40 words, tagging accuracy (the "tags" column says whose tags;
ours also teacher-forced, `tagging_forced`: the gold tag ranked first given the gold symbols before it),
exact match (EVALB's complete match, %), ill-formed outputs (ours without the mask: before repair),
sentences parsed per second (parsing only: ours after one untimed warm-up pass of the same sentences, which
compiles the search; SuPar's own figure for its predict loop), and training time where known: ours from the
run's train.log ("done:" lines: wall time with validations) and metrics.jsonl (seconds per step from each
logged window's tokens / tokens_per_sec: training only), SuPar's from its train log (its epochs, each with
a dev and a test evaluation). Our search splits each batch over every CPU core, as `jaxformer parse` does;
SuPar runs with one torch thread per core (--peer-threads). Only on idle cores. SuPar's files (the trees it
reads, its model, its logs) go to --work-dir (default: a temporary directory), outside the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "ptb_sample"
COLUMNS = ["engine", "tags", "f1", "f1_40", "tagging", "tagging_forced", "exact_match", "ill_formed",
           "sentences_per_s", "train_s", "s_per_step", "s_per_epoch"]
RIGHT_BRANCHING_LABEL = "S"  # the label README's 8.92 used for every constituent
PEER_EPOCHS = 100  # ~1 min an epoch on 2 CPU cores (../shared/data/ptb_sample/README.md): a 2-hour budget
PEER_PATIENCE = 20
# SuPar's pip package ships no config: its optimizer settings (those of its PTB config) must be given.
PEER_CONF = {"lr": 2e-3, "mu": .9, "nu": .9, "eps": 1e-12, "weight_decay": 0, "decay": .75, "decay_steps": 5000,
             "clip": 5.0, "batch_size": 5000}


class PeerError(RuntimeError):
    """SuPar could not train or predict: one line saying which step failed and why."""


def right_branching(tree):
    """The right-branching tree over `tree`'s words and tags: (S t1 (S t2 ... (S tn-1 tn))), every
    constituent labeled RIGHT_BRANCHING_LABEL."""
    from nltk.tree import Tree

    leaves = [Tree(tag, [word]) for word, tag in tree.pos()]
    node = Tree(RIGHT_BRANCHING_LABEL, leaves[-2:])
    for leaf in reversed(leaves[:-2]):
        node = Tree(RIGHT_BRANCHING_LABEL, [leaf, node])
    return node


def scores(gold, test, ill_formed: int) -> dict:
    from jaxformer.parseval import score_trees

    score = score_trees(gold, test)
    return {"f1": score.all.f1, "f1_40": score.short.f1, "tagging": score.all.tagging_accuracy,
            "exact_match": score.all.complete_match, "ill_formed": ill_formed, "precision": score.all.precision,
            "recall": score.all.recall, "sentences": score.all.sentences, "scored": score.all.scored,
            "skipped": score.all.skipped, "errors": score.all.errors, "parseval": score.as_dict()}


# --- our parser

def run_training(path: pathlib.Path) -> dict:
    """What a training workdir records of its training: train_s (the "done:" lines of train.log, wall time
    with validations, summed over invocations), train_steps, s_per_step (metrics.jsonl's training windows:
    tokens / tokens_per_sec, so validations and checkpoint saves are left out; the first window holds the
    compilation) and s_per_step_wall (train_s / train_steps). Empty for an export."""
    from jaxformer.metrics import LOG_FILE, read_records

    out: dict = {}
    log = path / LOG_FILE
    windows = [r for r in read_records(path) if r.get("split") == "train" and r.get("tokens_per_sec")]
    if windows:
        steps = max(r["step"] for r in windows)
        out.update(train_steps=steps, s_per_step=sum(r["tokens"] / r["tokens_per_sec"] for r in windows) / steps)
    if log.is_file():
        text = log.read_text(encoding="utf-8", errors="replace")
        done = [json.loads(m[1]) for m in re.finditer(r"jaxformer\.train: done: (\{.*\})$", text, re.MULTILINE)]
        started = len(re.findall(r"jaxformer\.train: model: .* steps \d+ -> \d+", text))
        if done:
            out.update(train_s=sum(d.get("seconds", 0.0) for d in done),
                       train_eval_s=sum(d.get("eval_seconds", 0.0) for d in done),
                       train_invocations=started, train_invocations_done=len(done))
            if out.get("train_steps"):
                out["s_per_step_wall"] = out["train_s"] / out["train_steps"]
            if started > len(done):
                print(f"# {log}: {started - len(done)} of {started} training invocations have no 'done:' line "
                      f"(stopped early): train_s counts only the finished ones", file=sys.stderr)
    return out


def forced_tagging(translator, trees, batch: int = 32) -> float:
    """The share (%) of the gold tags that the model ranks first when it is fed the gold tree's symbols before
    each one (teacher forcing, as in training; the searches' scores: PAD and BOS excluded). Beside the search's
    tagging accuracy it says whether a low figure is the model not reading its words (both low) or its own
    earlier symbols leading it astray (this one higher)."""
    import jax.numpy as jnp
    import numpy as np

    from jaxformer import grammar
    from jaxformer.data import BOS_ID, EOS_ID, PAD_ID
    from jaxformer.data.treebank import linearize
    from jaxformer.decode_masks import masked_logits
    from jaxformer.io.params import unwrap

    vocab = translator.tokenizer
    kinds = vocab.grammar_kinds()
    params = unwrap(translator.params)
    right = total = 0
    for start in range(0, len(trees), batch):
        pairs = [linearize(tree) for tree in trees[start:start + batch]]
        src = [ids + [EOS_ID] for ids in vocab.encode([" ".join(words) for words, _ in pairs])]  # as the search
        tgt = [ids + [EOS_ID] for ids in vocab.encode_target([" ".join(symbols) for _, symbols in pairs])]
        pad = lambda rows, first=(): np.array([list(first) + r + [PAD_ID] * (max(map(len, rows)) - len(r))  # noqa: E731
                                               for r in rows], np.int32)
        target = pad(tgt)
        logits = translator.model.apply({"params": params}, jnp.asarray(pad(src)),
                                        jnp.asarray(pad([r[:-1] for r in tgt], (BOS_ID,))))
        first = np.asarray(jnp.argmax(masked_logits(logits), axis=-1))
        is_tag = kinds[target] == grammar.TAG
        right += int(np.sum((first == target) & is_tag))
        total += int(np.sum(is_tag))
    return 100.0 * right / total if total else 0.0


def ours(args, gold) -> list[dict]:
    """Our parser with and without the grammar mask: one untimed warm-up pass, then one timed pass each."""
    from jaxformer.cli_args import decode_overrides, load_model
    from jaxformer.parsing import parse_words, word_limit

    translator = load_model(args)  # as `jaxformer parse` loads it
    overrides = decode_overrides(args)
    settings = {**translator.decode, **{k: v for k, v in overrides.items() if v is not None}}
    limit = word_limit(translator)
    print(f"# ours: {args.model}, checkpoint steps {translator.checkpoint_steps}, beam {settings['beam_size']}, "
          f"alpha {settings['length_penalty']}, batch {settings['batch_size']}, at most {limit} words")
    inside = [i for i, tree in enumerate(gold) if len(tree.leaves()) <= limit]
    if len(inside) < len(gold):
        print(f"# {len(gold) - len(inside)} sentences are over the model's limit of {limit} words: our parser "
              f"skips them (scored as skipped)", file=sys.stderr)
    words = [gold[i].leaves() for i in inside]
    training = run_training(pathlib.Path(args.model))
    forced = forced_tagging(translator, [gold[i] for i in inside])
    rows = []
    for grammar in (True, False):
        parse_words(translator, words, grammar=grammar, **overrides)  # warm-up: compiles the search
        start = time.perf_counter()
        parses = parse_words(translator, words, grammar=grammar, **overrides)
        seconds = time.perf_counter() - start
        trees = [None] * len(gold)
        for i, parse in zip(inside, parses):
            trees[i] = parse.tree
        rows.append({"engine": f"jaxformer {'grammar' if grammar else 'no-grammar'}", "tags": "predicted",
                     **scores(gold, trees, sum(p.repaired for p in parses)), "tagging_forced": forced,
                     "sentences_per_s": len(parses) / seconds, "parse_s": seconds,
                     "over_word_limit": len(gold) - len(inside), "model": str(args.model),
                     "checkpoint_steps": translator.checkpoint_steps, "beam_size": settings["beam_size"],
                     "length_penalty": settings["length_penalty"], "decode": settings, **training})
    return rows


# --- the trained peer: SuPar

def _seconds(text: str) -> float:
    """A Python timedelta as str() writes it ("1 day, 0:01:02.5", "0:00:09.123456") in seconds."""
    days = re.match(r"(\d+) days?, ", text)
    if days:
        text = text[days.end():]
    hours, minutes, seconds = text.split(":")
    return (int(days[1]) if days else 0) * 86400 + int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def _supar(mode: str, model: pathlib.Path, options: list[str], work: pathlib.Path, threads: int) -> None:
    """`python -m supar.cmds.crf_con MODE ...`, its output in WORK/supar.MODE.out; PeerError if it fails."""
    command = [sys.executable, "-m", "supar.cmds.crf_con", mode, "-p", str(model), "-d", "-1", "-t", str(threads),
               *options]
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}  # torch >= 2.6 refuses SuPar's own model files
    output = work / f"supar.{mode}.out"
    print(f"# supar {mode}: {' '.join(command)} (output: {output})", file=sys.stderr, flush=True)
    with open(output, "w") as sink:
        code = subprocess.call(command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=work)
    if code:
        lines = [line for line in output.read_text(errors="replace").splitlines() if line.strip()]
        last = lines[-1].strip() if lines else "no output"
        if mode == "train" and not model.exists():  # it then fails loading its best model, which it never saved
            raise PeerError(f"supar train saved no model: it saves one only when its dev F1 rises above the last "
                            f"best (from 0), and in its epochs it never did; train it longer or on more trees "
                            f"(its output: {output})")
        raise PeerError(f"supar {mode} exited with {code}: {last} (all of it: {output})")


def peer(args, gold, splits: dict, work: pathlib.Path) -> dict:
    """Train SuPar's CRF parser (unless --peer-model), predict the evaluated split, score it with ours."""
    import importlib.util

    from nltk.tree import Tree

    from jaxformer.data.treebank import to_bracket

    if importlib.util.find_spec("supar") is None:
        raise PeerError("supar is not installed: pip install supar==1.1.4 beside torch==2.13.0 (if pip wants "
                        "another torch: --no-deps, then its missing pure-Python dependencies), or run with --no-peer")
    threads = args.peer_threads
    files = {}
    for name, trees in splits.items():  # one (TOP ...) tree per line, as SuPar reads them
        files[name] = work / f"{name}.gld"
        files[name].write_text("".join(to_bracket(t) + "\n" for t in trees), encoding="utf-8")
    if args.peer_model:
        model = pathlib.Path(args.peer_model).resolve()
        if not model.is_file():
            raise PeerError(f"--peer-model {model}: no such file (a model of `python -m supar.cmds.crf_con train`)")
    else:
        model = work / "supar.crf_con.model"
        model.unlink(missing_ok=True)  # a model left by an earlier run must not pass for this one's
        conf = {**PEER_CONF, "epochs": args.peer_epochs, "patience": args.peer_patience}
        for item in args.peer_set:
            key, eq, value = item.partition("=")
            if not eq:
                raise SystemExit(f"error: --peer-set {item!r}: give KEY=VALUE, e.g. n_lstm_hidden=100")
            conf[key.strip()] = value.strip()
        (work / "con.ini").write_text("[Run]\n" + "".join(f"{k} = {v}\n" for k, v in conf.items()))
        _supar("train", model, ["-b", "-c", str(work / "con.ini"), "--feat", "char", "--embed", "",
                                "--train", str(files["train"]), "--dev", str(files["dev"]),
                                "--test", str(files["eval"])], work, threads)
    prediction = work / "supar.pred.gld"
    _supar("predict", model, ["--data", str(files["eval"]), "--pred", str(prediction)], work, threads)
    row = {"engine": "supar crf_con", "tags": "gold (its input)", "model": str(model), "threads": threads}
    trees, ill = [], 0
    lines = prediction.read_text(encoding="utf-8").splitlines()
    if len(lines) != len(gold):
        raise PeerError(f"supar predict wrote {len(lines)} trees for {len(gold)} sentences ({prediction})")
    for line in lines:
        try:
            trees.append(Tree.fromstring(line))
        except ValueError:
            trees.append(None)
            ill += 1
    row.update(scores(gold, trees, ill))
    log = pathlib.Path(f"{model}.predict.log").read_text(errors="replace")
    found = re.findall(r" INFO (.+?)s elapsed, ([\d.]+) Sents/s", log)
    if found:
        row.update(parse_s=_seconds(found[-1][0]), sentences_per_s=float(found[-1][1]))
    train_log = pathlib.Path(f"{model}.train.log")
    if train_log.is_file():
        text = train_log.read_text(errors="replace")
        elapsed = re.findall(r" INFO (.+?)s elapsed, (.+?)s/epoch", text)
        epochs = re.findall(r"Epoch (\d+) / (\d+):", text)
        best = re.findall(r"Epoch (\d+) saved", text)
        if elapsed:
            row.update(train_s=_seconds(elapsed[-1][0]), s_per_epoch=_seconds(elapsed[-1][1]))
        if epochs:
            row.update(epochs=int(epochs[-1][0]), epochs_asked=int(epochs[-1][1]))
        if best:
            row["best_epoch"] = int(best[-1])
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from jaxformer.cli_args import add_decode_args, add_model_args

    add_model_args(parser)
    add_decode_args(parser)
    parser.add_argument("--split", choices=("dev", "test"), default="test", help="the gold trees scored (default test)")
    parser.add_argument("--treebank", default=str(SAMPLE), help="the sample's folder of wsj_NNNN.mrg files")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="first N trees of each split only (the scored one, SuPar's train and dev): dry runs")
    parser.add_argument("--work-dir", default=None, help="SuPar's files: its trees, model and logs (default: a "
                        "temporary directory)")
    g = parser.add_argument_group("the peer (SuPar's CRF constituency parser)")
    g.add_argument("--no-peer", action="store_true", help="skip SuPar")
    g.add_argument("--peer-only", action="store_true",
                   help="SuPar alone: train it into --work-dir (while our run trains; a later run reuses it with "
                        "--peer-model), or with --peer-model score that model alone")
    g.add_argument("--peer-model", default=None, metavar="PATH", help="a trained SuPar crf_con model: predict only")
    g.add_argument("--peer-epochs", type=int, default=PEER_EPOCHS,
                   help=f"SuPar's training epochs (default {PEER_EPOCHS}: what a 2-hour budget allows on 2 CPU "
                        "cores at about a minute an epoch)")
    g.add_argument("--peer-patience", type=int, default=PEER_PATIENCE,
                   help=f"stop SuPar after this many epochs without a better dev F1 (default {PEER_PATIENCE})")
    g.add_argument("--peer-threads", type=int, default=os.cpu_count() or 1,
                   help="SuPar's torch threads (default: every core). On cores another job keeps busy, 2 threads "
                        "ran an epoch ~90x slower than 1 (OpenMP threads waiting on each other)")
    g.add_argument("--peer-set", action="append", default=[], metavar="KEY=VALUE",
                   help="another line of SuPar's .ini (a Python literal), e.g. n_lstm_hidden=100 (repeatable)")
    args = parser.parse_args(argv)

    from jaxformer import parallel
    parallel.use_every_cpu_core()  # before JAX starts: our search splits its batches over the cores

    from common import device_summary, report
    from jaxformer.data.treebank import read_split

    gold = read_split(args.treebank, args.split)[:args.limit]
    print(f"# {device_summary()}; {len(gold)} trees of the {args.split} split of {args.treebank}")
    if args.peer_only and args.no_peer:
        raise SystemExit("error: --peer-only is SuPar alone: drop --no-peer")
    rows = [] if args.peer_only else ours(args, gold)
    if not args.peer_only:
        rows.append({"engine": "right-branching", "tags": "gold", "label": RIGHT_BRANCHING_LABEL,
                     **scores(gold, [right_branching(t) for t in gold], 0)})
    if not args.no_peer:
        work = pathlib.Path(args.work_dir or tempfile.mkdtemp(prefix="jaxformer-parsing-")).resolve()
        work.mkdir(parents=True, exist_ok=True)
        print(f"# peer: SuPar's files in {work}")
        splits = {"eval": gold}
        if not args.peer_model:  # what it trains on
            splits.update(train=read_split(args.treebank, "train")[:args.limit],
                          dev=read_split(args.treebank, "dev")[:args.limit])
        try:
            rows.append(peer(args, gold, splits, work))
        except PeerError as e:
            print(f"# peer skipped: {e}", file=sys.stderr)
            rows.append({"engine": "supar crf_con", "error": str(e)})
    for row in rows:
        row.update(split=args.split, treebank=str(args.treebank))
    report(rows, COLUMNS)


if __name__ == "__main__":
    main()
