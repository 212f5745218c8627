"""The Multi30k training run: how `correctness` trains it (on the device and on the CPU beside it) and what
`decode` then loads."""

from __future__ import annotations

import contextlib
import os

from .context import Context, load_tokenizer

DEVICE_RUN, CPU_RUN = "train_gpu", "train_cpu"  # their folders in the work folder


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


def trained_model(ctx: Context):
    """(translator, what): the model `correctness` trained, or the Multi30k shape with random weights."""
    import jax

    from jaxformer import io
    from jaxformer.model import Transformer, TransformerConfig, init_params
    from jaxformer.translate import Translator

    workdir = os.path.join(ctx.work, DEVICE_RUN)
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        with contextlib.suppress(Exception):
            translator = io.load(workdir)
            return translator, f"trained on the device (checkpoint {translator.checkpoint_steps})"
    c = ctx.multi30k_config()
    tokenizer = load_tokenizer(ctx)
    cfg = TransformerConfig.from_dict(c.model.to_dict(), vocab_size=tokenizer.vocab_size)
    return (Translator(Transformer(cfg), init_params(cfg, jax.random.key(0)), tokenizer, c.decode.to_dict()),
            "random weights (no trained run): every hypothesis runs to the length limit")
