"""The train step with jaxformer's loss head beside the textbook one, interleaved in one process.

    python benchmarks/loss_head.py                          # small shape of train_vs_pytorch.py, and base
    python benchmarks/loss_head.py --shapes multi30k        # real Multi30k batches, configs/multi30k.py
    python benchmarks/loss_head.py --shapes small --repeats 9

"textbook": the pre-softmax projection as one einsum and the label-smoothed loss as log_softmax +
take_along_axis + sums, accuracy by argmax, all differentiated by JAX (jaxformer's head before
`jaxformer/loss.py`'s `token_statistics` and `model.output_logits`' hand-written backward pass).
"jaxformer": the step as it is. Everything else (model, optimizer, batch, dropout) is the same; both run
the same batches in turn after warm-up, so they see the same machine load. `speedup` is the median of the
per-pair ratios textbook_s / jaxformer_s. The multi30k shape reads ../shared/data/multi30k and trains a
throwaway vocabulary on it first (about a minute).
"""

from __future__ import annotations

import argparse
import contextlib
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
from jaxformer.optim import make_optimizer  # noqa: E402
from input_pipeline import recipe  # noqa: E402
from train_vs_pytorch import SHAPES, make_batch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def textbook_output_logits(y, kernel, dtype):
    return jnp.einsum("btd,dv->btv", y.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)


def textbook_loss_sums(params, batch, rng, *, model, smoothing, deterministic):
    logits = model.apply(params, batch["src"], batch["tgt_in"], deterministic=deterministic,
                         rngs=None if deterministic else {"dropout": rng},
                         **{k: batch[k] for k in steps_lib._OPTIONAL_FIELDS if k in batch})
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
    it = make_batches(config, tokenizer, "train", repeat=True, shuffle=True, num_devices=1)
    cfg = TransformerConfig.from_dict(config.model.to_dict(), vocab_size=tokenizer.vocab_size)
    return cfg, [next(it) for _ in range(4)], config.train


def measure(shape: str, repeats: int, data: str, tmp: str) -> list[dict]:
    cfg, host, train_cfg = step_inputs(shape, data, tmp)
    mesh = parallel.make_mesh()
    batches = [parallel.shard_batch(b, mesh) for b in host]
    runs = {}
    for name in ("textbook", "jaxformer"):
        with textbook_head() if name == "textbook" else contextlib.nullcontext():
            steps = steps_lib.Steps(Transformer(cfg), make_optimizer(train_cfg, cfg.d_model), mesh,
                                    label_smoothing=0.1)
            state = steps.init_state(seed=0)
            for batch in batches[:2]:  # compile and warm up
                state, metrics = steps.train(state, batch)
                jax.block_until_ready(metrics["loss"])
        runs[name] = [steps, state]
    times = {name: [] for name in runs}
    for i in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run[1], metrics = run[0].train(run[1], batches[i % len(batches)])
            jax.block_until_ready(metrics["loss"])
            times[name].append(time.perf_counter() - start)
    ratios = sorted(t / j for t, j in zip(times["textbook"], times["jaxformer"]))
    tokens = int(np.sum(host[0]["tgt_out"] != PAD_ID))
    return [{"shape": shape, "head": name, "batch": "x".join(map(str, host[0]["tgt_out"].shape)),
             "target_tokens": tokens, "step_s": float(np.median(values)), "repeats": repeats,
             "speedup": float(np.median(ratios)) if name == "jaxformer" else None,
             "speedup_range": f"{ratios[0]:.2f}-{ratios[-1]:.2f}" if name == "jaxformer" else None}
            for name, values in times.items()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["small", "base"], choices=sorted(SHAPES) + ["multi30k"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data", "multi30k"))
    args = parser.parse_args(argv)
    print(f"# device: {device_summary()}; {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="loss_head-") as tmp:
        rows = [row for shape in args.shapes for row in measure(shape, args.repeats, args.data, tmp)]
    report(rows, ["shape", "head", "batch", "target_tokens", "step_s", "speedup", "speedup_range"])


if __name__ == "__main__":
    main()
