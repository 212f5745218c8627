"""The options several `jaxformer` subcommands share (jaxformer/cli.py): which model and which of its
checkpoints (--model, --average-last, --step, --best, --average-best), the search settings (--beam-size, ...),
and `--config.SECTION.KEY=VALUE` overrides typed like the default config's values.
"""

from __future__ import annotations

import argparse
import ast
from typing import Any

from jaxformer.config import DECODE_PARALLEL, STOP_RULES

__all__ = ["add_decode_args", "add_model_args", "decode_overrides", "int_list", "load_model", "parse_overrides"]


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "--workdir", dest="model", required=True,
                   help="an export directory (config.json + params.safetensors) or a training workdir")
    p.add_argument("--average-last", type=int, default=None, metavar="K",
                   help="average the parameters of the K newest checkpoints (workdir only; default: the run's "
                        "train.average_last, fewer if fewer were kept; paper: 5 base, 20 big)")
    p.add_argument("--step", type=int, default=None,
                   help="use the checkpoint of this step (workdir only; with --average-last K: the K up to it)")
    p.add_argument("--best", action="store_true",
                   help="use the run's best checkpoint by validation (train.best_metric; needs train.keep_best)")
    p.add_argument("--average-best", type=int, default=None, metavar="K",
                   help="average the run's K best checkpoints by validation (needs train.keep_best >= K)")
    p.add_argument("--average-from-best", type=int, default=None, metavar="K",
                   help="average the run's best checkpoint by validation and the K-1 kept after it (needs "
                        "train.keep_best >= 1 and those checkpoints kept)")


def load_model(args):
    """The model --model names, chosen by --step / --average-last, or by validation (--best, --average-best)."""
    from jaxformer.io import load

    return load(args.model, step=args.step, average_last=args.average_last, best=args.best,
                average_best=args.average_best, average_from_best=args.average_from_best)


def add_decode_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("search (defaults: the model's decode settings)")
    g.add_argument("--beam-size", type=int, default=None, help="1 means greedy search (paper: 4)")
    g.add_argument("--length-penalty", "--alpha", dest="length_penalty", type=float, default=None,
                   help="alpha in ((5 + len) / 6) ** alpha (paper: 0.6)")
    g.add_argument("--max-extra-len", type=int, default=None, help="output at most input length + this (paper: 50)")
    g.add_argument("--batch-size", type=int, default=None, help="sentences per decoding batch")
    g.add_argument("--stop", choices=STOP_RULES, default=None,
                   help="beam search stops a sentence when no live beam can win (bound, the default) or once it "
                        "has beam-size finished hypotheses (finished: CTranslate2's and fairseq's rule)")
    g.add_argument("--parallel", choices=DECODE_PARALLEL, default=None,
                   help="several local devices: split each batch over them, or give each device its own "
                        "batches (auto: batches on CPU cores given 4 or more each, else split)")


def decode_overrides(args) -> dict:
    return {k: getattr(args, k) for k in ("beam_size", "length_penalty", "max_extra_len", "batch_size",
                                            "stop", "parallel")}


def parse_overrides(extra: list[str], section: str, defaults) -> dict[str, Any]:
    """`--config.data.key=value` / `--config.data.key value` (as train.py spells them; `--data.key` is an
    alias) -> {key: value}, typed like the default config's value."""
    out, i = {}, 0
    prefixes = (f"--config.{section}.", f"--{section}.")
    while i < len(extra):
        arg = extra[i]
        prefix = next((p for p in prefixes if arg.startswith(p)), None)
        if prefix is None:
            raise SystemExit(f"error: unrecognized argument {arg!r} (overrides look like {prefixes[0]}KEY=VALUE)")
        key, eq, value = arg[len(prefix):].partition("=")
        if not eq:
            if i + 1 >= len(extra):
                raise SystemExit(f"error: {arg} needs a value")
            value, i = extra[i + 1], i + 1
        i += 1
        if key not in defaults:
            raise SystemExit(f"error: unknown option {section}.{key}; known: {', '.join(sorted(defaults))}")
        out[key] = _typed(value, defaults[key], f"{section}.{key}")
    return out


def _typed(value: str, like: Any, name: str) -> Any:
    try:
        if isinstance(like, bool):
            if value.lower() in ("1", "true", "yes"):
                return True
            if value.lower() in ("0", "false", "no"):
                return False
            raise ValueError(value)
        if isinstance(like, int):
            return int(value)
        if isinstance(like, float):
            return float(value)
        if like is None:  # an optional value (e.g. model.d_k): a Python literal, else the text
            try:
                return ast.literal_eval(value)
            except (ValueError, SyntaxError):
                return value
        if isinstance(like, (tuple, list)):
            parsed = ast.literal_eval(value if value.strip().startswith(("(", "[")) else f"({value},)")
            return tuple(parsed)
    except (ValueError, SyntaxError):
        raise SystemExit(f"error: {name}={value!r} is not a valid {type(like).__name__}") from None
    return value
