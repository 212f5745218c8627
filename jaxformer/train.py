"""Training: the paper's optimizer and schedule (Section 5.3), label-smoothed loss (Section 5.4),
data-parallel train/eval steps, and the loop `run(config)` behind `python train.py`.

Read top to bottom: schedule and optimizer -> loss -> state and steps -> evaluation -> metrics -> the loop.

One update ("step", what `train.steps` counts) consumes `train.grad_accum_steps` batches of about
`data.tokens_per_batch` target tokens each; the gradient is that of the label-smoothed loss summed over
every non-pad target token of all of them, divided by their number, so accumulating k batches is the
same update as one batch k times larger (fairseq's --update-freq).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import pathlib
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxformer import checkpoint as ckpt
from jaxformer import parallel
from jaxformer.data import PAD_ID
from jaxformer.model import Transformer, TransformerConfig, count_params

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
DROPPED_METRICS_FILE = "metrics.dropped.jsonl"
TENSORBOARD_DIR = "tensorboard"
CURVES_FILE = "curves.png"
LOG_FILE = "train.log"


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message says what to do."""


# ------------------------------------------------------------------------------------------------ config


def check_train_config(train_cfg: ml_collections.ConfigDict) -> None:
    """Reject bad `train.*` values up front, naming the key."""
    def need(ok: bool, key: str, what: str):
        if not ok:
            raise ValueError(f"train.{key}={train_cfg[key]!r}: {what}")

    t = train_cfg
    need(t.steps >= 1, "steps", "must be >= 1")
    need(t.warmup_steps >= 1, "warmup_steps", "must be >= 1 (the schedule divides by it)")
    need(t.lr_scale > 0, "lr_scale", "must be > 0")
    need(0 <= t.adam_b1 < 1, "adam_b1", "must be in [0, 1)")
    need(0 <= t.adam_b2 < 1, "adam_b2", "must be in [0, 1)")
    need(t.adam_eps > 0, "adam_eps", "must be > 0")
    need(t.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(t.grad_clip_norm >= 0, "grad_clip_norm", "must be >= 0 (0: no clipping)")
    need(t.grad_accum_steps >= 1, "grad_accum_steps", "must be >= 1")
    need(0 <= t.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
    need(t.log_every >= 1, "log_every", "must be >= 1")
    need(t.eval_every >= 0, "eval_every", "must be >= 0 (0: only at the end)")
    need(t.eval_bleu_sentences >= 0, "eval_bleu_sentences", "must be >= 0 (0: no BLEU)")
    need(t.checkpoint_every_steps >= 0, "checkpoint_every_steps", "must be >= 0 (0: not by steps)")
    need(t.checkpoint_every_minutes >= 0, "checkpoint_every_minutes", "must be >= 0 (0: not by time)")
    need(t.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
    need(t.average_last >= 1, "average_last", "must be >= 1 (1: no averaging)")
    need(t.average_last <= t.keep_checkpoints, "average_last",
         f"cannot average more checkpoints than are kept (train.keep_checkpoints={t.keep_checkpoints})")
    need(t.distributed in ("auto", "on", "off"), "distributed", "must be 'auto', 'on' or 'off'")
    need(bool(str(t.workdir)), "workdir", "must name a directory")
    from sacrebleu.metrics import BLEU

    need(t.bleu_tokenize in BLEU.TOKENIZERS, "bleu_tokenize",
         f"must be one of sacreBLEU's tokenizers: {', '.join(BLEU.TOKENIZERS)}")


# ------------------------------------------------------------------------------- schedule and optimizer


def learning_rate_schedule(d_model: int, warmup_steps: int, scale: float = 1.0) -> optax.Schedule:
    """Eq. 3: lrate = scale · d_model^-0.5 · min(step^-0.5, step · warmup_steps^-1.5).

    optax calls a schedule with the number of updates already applied (0 for the first update); the
    paper's `step` numbers updates from 1, so the schedule evaluates the formula at count + 1. The first
    update therefore uses step 1's small positive rate (at step 0 the formula is 0 and the first update
    would be wasted), and the peak, d_model^-0.5 · warmup^-0.5 (7.0e-4 for d_model 512, warmup 4000), is
    the rate of update number `warmup_steps`, i.e. count = warmup_steps - 1.
    """
    peak_factor = float(scale) * float(d_model) ** -0.5
    warmup_factor = float(warmup_steps) ** -1.5

    def schedule(count):
        step = jnp.asarray(count, jnp.float32) + 1.0
        return peak_factor * jnp.minimum(jax.lax.rsqrt(step), step * warmup_factor)

    return schedule


def make_optimizer(train_cfg: ml_collections.ConfigDict, d_model: int) -> optax.GradientTransformation:
    """Adam(β1, β2, ε) on the schedule above (AdamW when train.weight_decay > 0), after optional
    clipping of the gradient's global norm to train.grad_clip_norm."""
    schedule = learning_rate_schedule(d_model, train_cfg.warmup_steps, train_cfg.lr_scale)
    if train_cfg.weight_decay > 0:
        adam = optax.adamw(schedule, b1=train_cfg.adam_b1, b2=train_cfg.adam_b2, eps=train_cfg.adam_eps,
                           weight_decay=train_cfg.weight_decay)
    else:
        adam = optax.adam(schedule, b1=train_cfg.adam_b1, b2=train_cfg.adam_b2, eps=train_cfg.adam_eps)
    if train_cfg.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip_norm), adam)
    return adam


# ---------------------------------------------------------------------------------------------- loss


def token_losses(logits: jax.Array, targets: jax.Array, smoothing: float) -> tuple[jax.Array, jax.Array]:
    """Per-token (label-smoothed loss, plain negative log-likelihood) for logits [..., V], targets [...].

    Smoothing as in the paper's Tensor2Tensor and in fairseq: the target distribution q puts 1 - ε on the
    true token and ε / (V - 1) on each of the other V - 1 (PAD included). The smoothed loss is the cross
    entropy H(q, p) minus q's own entropy H(q), i.e. KL(q ‖ p): 0 when the model predicts q exactly (as
    T2T and flax's WMT example report it; fairseq does not subtract H(q)). The constant changes the
    reported value, not the gradient.
    """
    vocab = logits.shape[-1]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    true_log_prob = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    nll = -true_log_prob
    if smoothing == 0.0:
        return nll, nll
    confidence = 1.0 - smoothing
    low = smoothing / (vocab - 1)
    cross_entropy = -(confidence * true_log_prob + low * (jnp.sum(log_probs, axis=-1) - true_log_prob))
    entropy = -(confidence * math.log(confidence) + (vocab - 1) * low * math.log(low))
    return cross_entropy - entropy, nll


def label_smoothed_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                                 smoothing: float = 0.1) -> tuple[jax.Array, jax.Array]:
    """(Σ weights · smoothed loss, Σ weights) over tokens; their ratio is the mean over non-pad tokens.

    `weights` is typically `targets != PAD_ID`. See `token_losses` for the smoothing variant.
    """
    smoothed, _ = token_losses(logits, targets, smoothing)
    weights = weights.astype(jnp.float32)
    return jnp.sum(smoothed * weights), jnp.sum(weights)


# ------------------------------------------------------------------------------------- state and steps


@flax.struct.dataclass
class TrainState:
    """Everything an update changes; a pytree, so it goes through `jit` and orbax whole."""

    step: jax.Array     # int32 scalar: updates applied so far
    params: Any         # {"params": ...}: float32 master weights, whatever the compute dtype
    opt_state: Any
    rng: jax.Array      # uint32 PRNG key data; update s draws its dropout from fold_in(rng, s)


_OPTIONAL_FIELDS = ("src_segments", "tgt_segments", "src_positions", "tgt_positions")


def _loss_sums(params, batch, rng, *, model: Transformer, smoothing: float, deterministic: bool):
    """(Σ smoothed loss, sums) over the batch's non-pad target tokens."""
    logits = model.apply(params, batch["src"], batch["tgt_in"], deterministic=deterministic,
                         rngs=None if deterministic else {"dropout": rng},
                         **{k: batch[k] for k in _OPTIONAL_FIELDS if k in batch})  # [B,T,V] float32
    targets = batch["tgt_out"]
    weights = (targets != PAD_ID).astype(jnp.float32)
    smoothed, nll = token_losses(logits, targets, smoothing)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    sums = {"loss": jnp.sum(smoothed * weights), "nll": jnp.sum(nll * weights),
            "correct": jnp.sum(correct * weights), "tokens": jnp.sum(weights)}
    return sums["loss"], sums


def compute_gradients(state: TrainState, batch, micro_step=0, *, model: Transformer, smoothing: float):
    """Gradient of the loss *summed* over the batch's tokens, and the batch's sums."""
    rng = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step), micro_step)
    grads, sums = jax.grad(_loss_sums, has_aux=True)(state.params, batch, rng, model=model,
                                                     smoothing=smoothing, deterministic=False)
    return grads, sums


def apply_gradients(state: TrainState, grads, sums, *, tx: optax.GradientTransformation):
    """One optimizer update with the token-mean gradient; returns (new state, metrics sums + grad_norm)."""
    grads = jax.tree.map(lambda g: g / jnp.maximum(sums["tokens"], 1.0), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    metrics = dict(sums, grad_norm=grad_norm)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def train_step(state: TrainState, batch, *, model: Transformer, tx: optax.GradientTransformation,
               smoothing: float):
    """One update from one batch: pure (state, batch) -> (state, metrics)."""
    grads, sums = compute_gradients(state, batch, model=model, smoothing=smoothing)
    return apply_gradients(state, grads, sums, tx=tx)


def accumulate_gradients(state: TrainState, batch, accumulated, micro_step, *, model: Transformer,
                         smoothing: float):
    """Add one micro-batch's gradient and sums to `accumulated` ((grads, sums), summed over tokens)."""
    grads, sums = compute_gradients(state, batch, micro_step, model=model, smoothing=smoothing)
    return jax.tree.map(jnp.add, accumulated, (grads, sums))


def _apply_accumulated(state, accumulated, *, tx):
    grads, sums = accumulated
    return apply_gradients(state, grads, sums, tx=tx)


def eval_step(params, batch, totals, *, model: Transformer, smoothing: float):
    """`totals` plus the batch's sums of smoothed loss, nll, correct predictions and tokens (no dropout).

    Threading the totals through makes each evaluation depend on the previous one. Independent programs
    with all-reduces can otherwise run concurrently on a multi-device CPU and deadlock in the collective.
    """
    sums = _loss_sums(params, batch, None, model=model, smoothing=smoothing, deterministic=True)[1]
    return jax.tree.map(jnp.add, totals, sums)


def _zero_sums():
    zero = jnp.zeros((), jnp.float32)
    return {"loss": zero, "nll": zero, "correct": zero, "tokens": zero}


def _zero_accumulator(params):
    return jax.tree.map(jnp.zeros_like, params), _zero_sums()


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


class Steps:
    """The jit-compiled steps for one model, optimizer and mesh (each compiles once per batch shape).

    State, metrics and parameters live replicated on the mesh; batches arrive split over its "data" axis,
    so each step is one program over the whole global batch.
    """

    def __init__(self, model: Transformer, tx: optax.GradientTransformation, mesh, *, label_smoothing: float):
        self.model, self.tx, self.mesh = model, tx, mesh
        out = parallel.replicated(mesh)
        kw = dict(model=model, smoothing=float(label_smoothing))
        self.train = jax.jit(functools.partial(train_step, tx=tx, **kw), donate_argnums=0, out_shardings=out)
        self.accumulate = jax.jit(functools.partial(accumulate_gradients, **kw), donate_argnums=2,
                                  out_shardings=out)
        self.apply = jax.jit(functools.partial(_apply_accumulated, tx=tx), donate_argnums=0, out_shardings=out)
        self.zeros = jax.jit(_zero_accumulator, out_shardings=out)
        self._eval = jax.jit(functools.partial(eval_step, **kw), donate_argnums=2, out_shardings=out)
        self._zero_sums = jax.jit(_zero_sums, out_shardings=out)
        self.all_finite = jax.jit(_all_finite)

    def _init(self, seed: int) -> TrainState:
        init_key, dropout_key = jax.random.split(jax.random.key(seed))
        tokens = jnp.ones((1, 8), jnp.int32)
        params = self.model.init(init_key, tokens, tokens)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                          rng=jax.random.key_data(dropout_key))

    def init_state(self, seed: int) -> TrainState:
        """Fresh parameters and optimizer state from `seed`, replicated over the mesh."""
        return jax.jit(self._init, static_argnums=0, out_shardings=parallel.replicated(self.mesh))(seed)

    def abstract_state(self) -> TrainState:
        """The state's shapes, dtypes and placement, without computing (or allocating) it: a restore target."""
        shapes = jax.eval_shape(self._init, 0)
        sharding = parallel.replicated(self.mesh)
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)

    def evaluate(self, params, batches) -> dict:
        """Host sums (loss, nll, correct, tokens) over global batches, without dropout."""
        totals = self._zero_sums()
        for batch in batches:
            totals = self._eval(params, batch, totals)
        return jax.device_get(totals)

    def update(self, state: TrainState, batches: list) -> tuple[TrainState, dict]:
        """One optimizer update from one or more (accumulated) global batches."""
        if len(batches) == 1:
            return self.train(state, batches[0])
        accumulated = self.zeros(state.params)
        for i, batch in enumerate(batches):
            accumulated = self.accumulate(state, batch, accumulated, i)
        return self.apply(state, accumulated)


# ---------------------------------------------------------------------------------------------- evaluation


def _summarize(sums: dict) -> dict:
    tokens = max(float(sums["tokens"]), 1.0)
    nll = float(sums["nll"]) / tokens
    return {"loss": float(sums["loss"]) / tokens, "nll": nll, "ppl": math.exp(nll) if nll < 700 else float("inf"),
            "accuracy": float(sums["correct"]) / tokens, "tokens": int(sums["tokens"])}


def evaluate_loss(steps: Steps, params, batches: list) -> dict:
    """Smoothed loss, nll, perplexity and token accuracy over a list of host batches."""
    sums = steps.evaluate(params, parallel.global_batches(batches, steps.mesh))
    if not sums["tokens"]:
        raise ValueError("the validation split gave no target tokens")
    return _summarize(sums)


def evaluate_bleu(model: Transformer, params, tokenizer, pairs: list[tuple[str, str]], decode_cfg, *,
                  tokenize: str = "13a") -> tuple[dict, list[str]]:
    """Decode the sources of `pairs`; ({"bleu": sacreBLEU on the raw references, "exact_match": fraction of
    outputs equal to their reference}, the outputs)."""
    from jaxformer.evaluate import corpus_bleu
    from jaxformer.translate import translate_texts

    hypotheses = translate_texts(model, parallel.to_local(params), tokenizer, [s for s, _ in pairs], decode_cfg)
    references = [t for _, t in pairs]
    bleu = corpus_bleu(hypotheses, references, tokenize=tokenize or None).score
    exact = sum(h.strip() == r.strip() for h, r in zip(hypotheses, references)) / len(pairs)
    return {"bleu": bleu, "exact_match": exact}, hypotheses


# ---------------------------------------------------------------------------------------------- metrics


class MetricsLog:
    """metrics.jsonl (one object per record), TensorBoard events and curves.png, written by process 0.

    On resume from step s, records after s (from the part of an interrupted run that is about to be
    redone) move from metrics.jsonl to metrics.dropped.jsonl, and TensorBoard purges them, so the curves
    show one history.
    """

    def __init__(self, workdir: pathlib.Path, start_step: int, enabled: bool = True):
        self.path = workdir / METRICS_FILE
        self.curves = workdir / CURVES_FILE
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        self._truncate_after(start_step)
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(workdir / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step else None)

    def _lines(self) -> list[tuple[str, Any]]:
        """(line, parsed record or None for a line torn by a kill mid-write) for each line of metrics.jsonl."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append((line, json.loads(line)))
            except json.JSONDecodeError:
                out.append((line, None))
        return out

    def _truncate_after(self, step: int) -> None:
        """Move records after `step` (and torn lines) to metrics.dropped.jsonl; keep the rest in place."""
        lines = self._lines()
        kept = lambda record: isinstance(record, dict) and record.get("step", 0) <= step  # noqa: E731
        keep = [line for line, r in lines if kept(r)]
        dropped = [line for line, r in lines if not kept(r)]
        if not dropped:
            return
        with open(self.path.with_name(DROPPED_METRICS_FILE), "a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in dropped))
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
        os.replace(tmp, self.path)
        log.info("%s: moved %d record(s) after step %d, which is redone now, to %s",
                 self.path, len(dropped), step, DROPPED_METRICS_FILE)

    def write(self, split: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, "time": round(time.time(), 3), **values}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(f"{split}/{key}", value, step)

    def records(self) -> list[dict]:
        return [r for _, r in self._lines() if isinstance(r, dict)]

    def plot(self) -> None:
        """curves.png: training and validation loss, the learning rate, and validation BLEU by step."""
        if not self.enabled:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = self.records()
        series = lambda split, key: [(r["step"], r[key]) for r in records  # noqa: E731
                                     if r.get("split") == split and isinstance(r.get(key), (int, float))]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for split, key, label in (("train", "loss", "train loss (smoothed)"), ("train", "nll", "train nll"),
                                  ("valid", "loss", "valid loss (smoothed)"), ("valid", "nll", "valid nll")):
            points = series(split, key)
            if points:
                axes[0].plot(*zip(*points), label=label, marker="o" if split == "valid" else None)
        axes[0].set(xlabel="step", ylabel="loss (nats / token)", title="loss")
        axes[0].legend()
        points = series("train", "lr")
        if points:
            axes[1].plot(*zip(*points))
        axes[1].set(xlabel="step", ylabel="learning rate", title="learning rate")
        for split, label in (("valid", "valid BLEU"), ("valid_avg", "valid BLEU, averaged checkpoints")):
            points = series(split, "bleu")
            if points:
                axes[2].plot(*zip(*points), marker="o", label=label)
        axes[2].set(xlabel="step", ylabel="BLEU", title="validation BLEU")
        if axes[2].lines:
            axes[2].legend()
        fig.tight_layout()
        tmp = self.curves.with_name(f"{self.curves.stem}.tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, self.curves)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


# ---------------------------------------------------------------------------------------------- the loop


def _fmt(values: dict) -> str:
    parts = []
    for key in ("loss", "nll", "ppl", "accuracy", "bleu", "exact_match", "lr", "grad_norm", "tokens_per_sec"):
        if key in values:
            value = values[key]
            parts.append(f"{key} {value:.3g}" if key in ("lr", "ppl") else f"{key} {value:.4g}")
    return ", ".join(parts)


@contextlib.contextmanager
def _log_to_file(path: pathlib.Path):
    """Everything jaxformer logs during the run also goes to workdir/train.log."""
    logger = logging.getLogger("jaxformer")
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    previous = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
        handler.close()


class _Trainer:
    """The state of one invocation of `run`: kept in one place so the loop reads top to bottom."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: pathlib.Path):
        from jaxformer.data import get_tokenizer

        self.config, self.workdir, self.t = config, workdir, config.train
        self.is_chief = jax.process_index() == 0
        self.tokenizer = get_tokenizer(config, str(workdir))
        self.model_cfg = TransformerConfig.from_dict(config.model.to_dict(), vocab_size=self.tokenizer.vocab_size)
        self.model = Transformer(self.model_cfg)
        self.mesh = parallel.make_mesh()
        self.schedule = learning_rate_schedule(self.model_cfg.d_model, self.t.warmup_steps, self.t.lr_scale)
        self.steps = Steps(self.model, make_optimizer(self.t, self.model_cfg.d_model), self.mesh,
                           label_smoothing=self.t.label_smoothing)
        self.store = ckpt.CheckpointStore(workdir / ckpt.CHECKPOINT_DIR, keep=self.t.keep_checkpoints,
                                          async_save=self.t.async_checkpointing)
        self._valid_batches = None
        self._bleu_pairs = None

    # -- data

    def train_batches(self):
        from jaxformer.data import make_batches

        return make_batches(self.config, self.tokenizer, "train", repeat=True, shuffle=True,
                            num_devices=parallel.local_devices_in(self.mesh))

    def valid_batches(self) -> list:
        if self._valid_batches is None:
            from jaxformer.data import make_batches

            self._valid_batches = list(make_batches(self.config, self.tokenizer, "valid", repeat=False,
                                                    shuffle=False, num_devices=parallel.local_devices_in(self.mesh)))
        return self._valid_batches

    def bleu_pairs(self) -> list:
        if self._bleu_pairs is None:
            from jaxformer.data import read_pairs

            n = int(self.t.eval_bleu_sentences)
            self._bleu_pairs = read_pairs(self.config.data, "valid", limit=n) if n else []
        return self._bleu_pairs

    # -- pieces of the loop

    def evaluate(self, params) -> dict:
        """Validation loss/perplexity/accuracy, and BLEU on the first train.eval_bleu_sentences pairs."""
        result = evaluate_loss(self.steps, params, self.valid_batches())
        pairs = self.bleu_pairs()
        if pairs:
            scores, hypotheses = evaluate_bleu(self.model, params, self.tokenizer, pairs, self.config.decode,
                                               tokenize=self.t.bleu_tokenize)
            result.update(scores)
            log.info("sample: %r -> %r (reference %r)", pairs[0][0], hypotheses[0], pairs[0][1])
        return result

    def save(self, state: TrainState, data_state: dict) -> None:
        if not bool(self.steps.all_finite(state.params)):
            raise TrainingError(f"the parameters after step {int(state.step)} are not finite; not saving them. "
                                f"{self.last_good()} Lower train.lr_scale or set train.grad_clip_norm.")
        self.store.save(int(state.step), params=state.params, opt_state=state.opt_state, rng=state.rng,
                        data_state=data_state)

    def last_good(self) -> str:
        self.store.wait()
        kept = self.store.steps
        if not kept:
            return "No checkpoint was written."
        return (f"The last good checkpoint is step {kept[-1]} in {self.store.directory}; "
                f"rerunning resumes from it.")

    def check_finite(self, window: list[tuple[int, dict]]) -> None:
        for step, m in window:
            if not (math.isfinite(float(m["loss"])) and math.isfinite(float(m["grad_norm"]))):
                raise TrainingError(
                    f"non-finite training loss at step {step} (loss {float(m['loss'])}, gradient norm "
                    f"{float(m['grad_norm'])}); stopped without saving it. {self.last_good()} Lower "
                    f"train.lr_scale, set train.grad_clip_norm, or compute in float32 (model.dtype).")


def run(config: ml_collections.ConfigDict) -> dict:
    """Train as `config` says, resuming from `config.train.workdir` when it holds checkpoints.

    Returns the final metrics: step, the last training window's (train_*), validation (valid_*: loss,
    nll, ppl, accuracy, bleu) and, with train.average_last > 1, those of the averaged checkpoints
    (valid_avg_*). Raises TrainingError on a non-finite loss, ValueError / DataError on bad config or data,
    CheckpointError when no checkpoint of the workdir restores.
    """
    check_train_config(config.train)
    TransformerConfig.from_dict(config.model.to_dict(), vocab_size=8)  # model keys, before any slow work
    parallel.maybe_initialize_distributed(config.train.distributed)
    workdir = pathlib.Path(config.train.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    with _log_to_file(workdir / LOG_FILE) if jax.process_index() == 0 else contextlib.nullcontext():
        return _run(config, workdir)


def _run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    started = time.monotonic()
    trainer = _Trainer(config, workdir)
    t, steps = config.train, trainer.steps
    train_batches = trainer.train_batches()
    target = steps.abstract_state()
    restored = trainer.store.restore_latest(params_like=target.params, opt_state_like=target.opt_state)
    if restored is None:
        state = steps.init_state(int(t.seed))
    else:
        # Placed as the steps' outputs are, so the first update does not compile for another placement.
        step, rng = parallel.replicate((np.int32(restored.step), restored.rng), trainer.mesh)
        state = TrainState(step=step, params=restored.params, opt_state=restored.opt_state, rng=rng)
        positions = restored.data_state.get("processes", [])
        if len(positions) != jax.process_count():
            raise ckpt.CheckpointError(f"checkpoint step {restored.step} was written by {len(positions)} process(es), "
                                       f"this run has {jax.process_count()}; resume with the same process count")
        train_batches.load_state_dict(positions[jax.process_index()])
        log.info("resumed from checkpoint step %d in %s", restored.step, trainer.store.directory)
    if trainer.is_chief:  # only now: a config whose model does not fit the checkpoints must not replace it
        ckpt.save_run_config(config, workdir)
    start = int(state.step)
    log.info("model: %s parameters, vocabulary %d; %d device(s) over %d process(es); steps %d -> %d; workdir %s",
             f"{count_params(state.params):,}", trainer.tokenizer.vocab_size, jax.device_count(),
             jax.process_count(), start, t.steps, workdir)

    metrics = MetricsLog(workdir, start, enabled=trainer.is_chief)
    batches = parallel.global_batches(train_batches, trainer.mesh)
    accum = int(t.grad_accum_steps)
    result: dict[str, Any] = {"step": start, "workdir": str(workdir)}
    window: list[tuple[int, dict]] = []
    window_start = last_save_time = time.monotonic()
    bar = tqdm(total=t.steps, initial=start, unit="step", dynamic_ncols=True,
               disable=not (t.progress_bar and trainer.is_chief))

    def flush():
        nonlocal window, window_start
        fetched = jax.device_get(window)
        window = []
        trainer.check_finite(fetched)
        sums = {k: sum(float(m[k]) for _, m in fetched) for k in ("loss", "nll", "correct", "tokens")}
        step = fetched[-1][0]
        elapsed = max(time.monotonic() - window_start, 1e-9)
        values = _summarize(sums)
        values.update(lr=float(trainer.schedule(step - 1)), grad_norm=float(fetched[-1][1]["grad_norm"]),
                      tokens_per_sec=sums["tokens"] / elapsed)
        metrics.write("train", step, values)
        if bar.disable and trainer.is_chief:
            log.info("step %d train: %s", step, _fmt(values))
        bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{values['lr']:.2e}",
                        tok_s=f"{values['tokens_per_sec']:.0f}", refresh=False)
        result.update({f"train_{k}": v for k, v in values.items()})
        window_start = time.monotonic()

    def do_eval(step: int, params, split: str = "valid"):
        nonlocal window_start
        values = trainer.evaluate(params)
        metrics.write(split, step, values)
        log.info("step %d %s: %s", step, split, _fmt(values))
        result.update({f"{split}_{k}": v for k, v in values.items()})
        if t.plot:
            metrics.plot()
        window_start = time.monotonic()

    try:
        redirect = logging_redirect_tqdm() if not bar.disable else contextlib.nullcontext()
        with redirect:  # log lines go above the progress bar
            for step in range(start + 1, t.steps + 1):
                state, step_metrics = steps.update(state, [next(batches) for _ in range(accum)])
                window.append((step, step_metrics))
                bar.update(1)
                last = step == t.steps
                save = last or (t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0)
                if not save and t.checkpoint_every_minutes and step % t.log_every == 0:
                    save = _agree(time.monotonic() - last_save_time >= 60 * t.checkpoint_every_minutes)
                evaluate = last or (t.eval_every and step % t.eval_every == 0)
                if last or save or evaluate or step % t.log_every == 0:
                    flush()
                if save:
                    trainer.save(state, {"processes": parallel.allgather_json(train_batches.state_dict())})
                    last_save_time = window_start = time.monotonic()
                if evaluate:
                    do_eval(step, state.params)
                result["step"] = step
            if start >= t.steps:
                log.info("workdir %s already holds step %d >= train.steps=%d: evaluating only", workdir, start, t.steps)
                do_eval(start, state.params)
            trainer.store.wait()
            if t.average_last > 1:
                kept = trainer.store.steps
                if len(kept) >= t.average_last:
                    averaged = ckpt.load_params(workdir, average_last=int(t.average_last))
                    do_eval(kept[-1], parallel.replicate(averaged, trainer.mesh), "valid_avg")
                else:
                    log.info("not evaluating averaged checkpoints: %d kept, train.average_last=%d",
                             len(kept), t.average_last)
    except BaseException as error:
        if isinstance(error, KeyboardInterrupt):
            log.warning("interrupted at step %d. %s", int(result["step"]), trainer.last_good())
        if t.plot:
            metrics.plot()  # the curves up to the failure
        raise
    finally:
        bar.close()
        trainer.store.close()
        metrics.close()
    result["seconds"] = round(time.monotonic() - started, 1)
    log.info("done: %s", json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}))
    return result


def _agree(flag: bool) -> bool:
    """Process 0's decision, so every process saves at the same step (time differs between hosts)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))
