"""The train step beside a copy with one part as it was before, interleaved in one process.

    python benchmarks/step_ab.py                                   # both earlier versions, small and base
    python benchmarks/step_ab.py --baselines textbook-head --shapes multi30k   # real Multi30k batches
    python benchmarks/step_ab.py --baselines bernoulli-dropout --shapes small --repeats 11
    python benchmarks/step_ab.py --baselines commit:5ddbeec --shapes small multi30k   # the step of a commit

Baselines (everything else, model, optimizer, batch, is the same):
- "textbook-head": the pre-softmax projection as one einsum and the label-smoothed loss as log_softmax +
  take_along_axis + sums, accuracy by argmax, all differentiated by JAX (jaxformer's head before
  `jaxformer/loss.py`'s `token_statistics` and `ops.output_logits`' hand-written backward pass).
- "bernoulli-dropout": dropout masks from `jax.random.bernoulli`, one 32-bit threefry word per decision
  (flax's `nn.Dropout`, jaxformer's dropout before `ops.dropout_keep_mask`'s two decisions per word).
- "no-dropout": not an earlier version but a reference: dropout is the identity, so 1 − `speedup` is about
  the share of the step that dropout costs.
- "one-device": the same step on one CPU device, as train.py ran before it made every core a device
  (`parallel.use_every_cpu_core()`) and split each batch over them.
- "replicated-optimizer": Adam's moments on every device, each device running the whole update, as before
  `train.shard_optimizer_state` split them over the devices.
- "commit:REV": the whole step of git commit REV (`at_commit.package_at`), same parameters and batches; the
  current model is built with model.attention_bias=True, which commits before the option always had.
"jaxformer": the step as it is, data parallel over every CPU core, with the optimizer state placed as
`train.shard_optimizer_state` of the shape's config says. Both run the same batches in turn after
warm-up, so they see the same machine load; `speedup` is the median of the per-pair ratios baseline_s /
jaxformer_s. The multi30k shape reads ../shared/data/multi30k and trains a throwaway vocabulary on it first
(about a minute).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import device_summary, report  # noqa: E402
from jaxformer import model as model_lib  # noqa: E402
from jaxformer import parallel, steps as steps_lib  # noqa: E402
from jaxformer.config import default_config  # noqa: E402
from jaxformer.data import PAD_ID, Tokenizer, make_batches, sample_sentences  # noqa: E402
from jaxformer.model import Transformer, TransformerConfig  # noqa: E402
from input_pipeline import recipe  # noqa: E402
from train_vs_pytorch import SHAPES, make_batch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def textbook_output_logits(y, kernel, dtype):
    return jnp.einsum("btd,dv->btv", y.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)


def textbook_loss_sums(params, batch, rng, *, model, smoothing, deterministic):
    logits = model.apply(params, batch["src"], batch["tgt_in"], deterministic=deterministic,
                         rngs=None if deterministic else {"dropout": rng},
                         **{k: batch[k] for k in steps_lib.OPTIONAL_FIELDS if k in batch})
    targets = batch["tgt_out"]
    weights = (targets != PAD_ID).astype(jnp.float32)
    vocab = logits.shape[-1]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    true = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    confidence, low = 1.0 - smoothing, smoothing / (vocab - 1)
    smoothed = -(confidence * true + low * (jnp.sum(log_probs, axis=-1) - true)) \
        + (confidence * math.log(confidence) + (vocab - 1) * low * math.log(low))
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    sums = {"loss": jnp.sum(smoothed * weights), "nll": jnp.sum(-true * weights),
            "correct": jnp.sum(correct * weights), "tokens": jnp.sum(weights)}
    return sums["loss"], sums


def bernoulli_dropout(x, rate, rng):
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


@contextlib.contextmanager
def dropout_as(fn):
    """Trace (compile) with `fn(x, rate, rng)` patched in for `model.dropout`."""
    saved = model_lib.dropout
    model_lib.dropout = fn
    try:
        yield
    finally:
        model_lib.dropout = saved


@contextlib.contextmanager
def textbook_head():
    """Trace (compile) with the textbook head patched in; the patch only matters while jit traces."""
    saved = steps_lib._loss_sums, model_lib.output_logits
    steps_lib._loss_sums, model_lib.output_logits = textbook_loss_sums, textbook_output_logits
    try:
        yield
    finally:
        steps_lib._loss_sums, model_lib.output_logits = saved


def step_inputs(shape: str, data: str, tmp: str):
    """(model config, host batches, train config) for a shape of train_vs_pytorch.py (one random batch),
    or for "multi30k": configs/multi30k.py with a throwaway vocabulary and 4 real batches."""
    if shape != "multi30k":
        spec = SHAPES[shape]
        cfg = TransformerConfig(**spec["model"], dropout_rate=0.1, dtype="float32")
        return cfg, [make_batch(cfg, spec)], default_config().train
    config = recipe("multi30k")
    config.data.update(source="files", train_files=os.path.join(data, "train"), valid_files=os.path.join(data, "val"),
                       cache_dir=os.path.join(tmp, "cache"))
    tokenizer = Tokenizer.train(sample_sentences(config.data, config.data.vocab_sample_size), config.data.vocab_size,
                                os.path.join(tmp, "vocab.model"))
    it = make_batches(config, tokenizer, "train", repeat=True, shuffle=True, num_devices=jax.device_count())
    cfg = TransformerConfig.from_dict(config.model.to_dict(), vocab_size=tokenizer.vocab_size)
    return cfg, [next(it) for _ in range(4)], config.train


BASELINES = {"textbook-head": textbook_head,
             "bernoulli-dropout": lambda: dropout_as(bernoulli_dropout),
             "no-dropout": lambda: dropout_as(lambda x, rate, rng: x),
             "one-device": contextlib.nullcontext,
             "replicated-optimizer": contextlib.nullcontext}


def _commit_steps(rev: str, cfg: TransformerConfig, train_cfg, mesh):
    """The Steps of commit `rev` for the same model."""
    import dataclasses

    from at_commit import package_at

    old = package_at(rev)
    known = {f.name for f in dataclasses.fields(old.model.TransformerConfig)}
    old_cfg = old.model.TransformerConfig(**{k: v for k, v in cfg.to_dict().items() if k in known})
    return old.steps.Steps.from_config(old.model.Transformer(old_cfg), train_cfg, mesh)


def measure(shape: str, baseline: str, repeats: int, data: str, tmp: str) -> list[dict]:
    cfg, host, train_cfg = step_inputs(shape, data, tmp)
    commit = baseline.partition("commit:")[2]
    if commit:
        cfg = dataclasses.replace(cfg, attention_bias=True)
    runs = {}
    for name in (baseline, "jaxformer"):
        mesh = parallel.make_mesh(jax.devices()[:1] if name == "one-device" else None)
        batches = [parallel.shard_batch(b, mesh) for b in host]
        patch = BASELINES.get(baseline, contextlib.nullcontext) if name == baseline else contextlib.nullcontext
        with patch():  # a patch matters while jit traces: through the warm-up steps
            if name == baseline and commit:
                steps = _commit_steps(commit, cfg, train_cfg, mesh)
            else:
                steps = steps_lib.Steps.from_config(Transformer(cfg), train_cfg, mesh, shard_optimizer_state=False
                                                    if name == "replicated-optimizer" else None)
            state = steps.init_state(seed=0)
            for batch in batches[:2]:  # compile and warm up
                state, metrics = steps.train(state, batch)
                jax.block_until_ready(metrics["loss"])
        runs[name] = [steps, state, batches]
    times = {name: [] for name in runs}
    for i in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run[1], metrics = run[0].train(run[1], run[2][i % len(run[2])])
            jax.block_until_ready(metrics["loss"])
            times[name].append(time.perf_counter() - start)
    ratios = sorted(b / j for b, j in zip(times[baseline], times["jaxformer"]))
    tokens = int(np.sum(host[0]["tgt_out"] != PAD_ID))
    return [{"shape": shape, "step": name, "batch": "x".join(map(str, host[0]["tgt_out"].shape)),
             "target_tokens": tokens, "step_s": float(np.median(values)), "repeats": repeats,
             "speedup": float(np.median(ratios)) if name == "jaxformer" else None,
             "speedup_range": f"{ratios[0]:.2f}-{ratios[-1]:.2f}" if name == "jaxformer" else None}
            for name, values in times.items()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["small", "base"], choices=sorted(SHAPES) + ["multi30k"])
    parser.add_argument("--baselines", nargs="+", default=["textbook-head", "bernoulli-dropout"],
                        help=f"any of {', '.join(sorted(BASELINES))}, or commit:REV")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data", "multi30k"))
    args = parser.parse_args(argv)
    parallel.use_every_cpu_core()  # the step as train.py runs it
    print(f"# device: {device_summary()}; {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="step_ab-") as tmp:
        rows = [row for baseline in args.baselines for shape in args.shapes
                for row in measure(shape, baseline, args.repeats, args.data, tmp)]
    report(rows, ["shape", "step", "batch", "target_tokens", "step_s", "speedup", "speedup_range"])


if __name__ == "__main__":
    main()
