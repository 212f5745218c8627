"""The training loop `run(config)` behind `python train.py`.

The pieces it drives, each in its own module: `optim` (Adam + the paper's rate), `loss` (label smoothing),
`steps` (the compiled data-parallel steps), `checkpoint` (orbax), `metrics` (logs and curves). Read `_run`
top to bottom: restore or init -> for each step: batches -> update -> log / save / evaluate -> averaged eval.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pathlib
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxformer import checkpoint as ckpt
from jaxformer import parallel
from jaxformer.config import check_lengths
from jaxformer.io import init_from
from jaxformer.metrics import LOG_FILE, MetricsLog, fmt, log_to_file
from jaxformer.model import Transformer, TransformerConfig, accelerator_platform, count_params
from jaxformer.optim import learning_rate_schedule
from jaxformer.preemption import Preempted, StopSignals
from jaxformer.steps import Steps, TrainState, evaluate_loss, summarize

log = logging.getLogger(__name__)

# Steps the host may dispatch beyond the last one the device has finished. Two keep the device fed (the
# next step is queued while one runs) and bound how late a stop request is seen: without a bound the host
# ran up to train.log_every steps ahead (it only waited when it fetched metrics), so a SIGTERM was honoured
# 33 steps (70 s) after it arrived on Multi30k, past the ~30 s grace of a cloud preemption.
_STEPS_AHEAD = 2


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message says what to do."""


# ------------------------------------------------------------------------------------------------ config

def _log_packed_attention(config) -> None:
    """On a CUDA GPU, say why training attention is XLA's and not cuDNN's when batches are packed: packed
    rows need segment masks, which cuDNN's fused attention does not take through the public
    `jax.nn.dot_product_attention` API (it takes causal and padding-as-lengths masks only)."""
    if (bool(config.data.get("pack", False)) and config.model.get("attention_impl", "auto") == "auto"
            and accelerator_platform() == "cuda"):
        log.info("data.pack=True: packed rows use segment masks, which cuDNN fused attention does not take, so "
                 "training attention runs on XLA; set data.pack=False for cuDNN (more padding, several shapes)")


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
    need(t.distributed_timeout_s > 0, "distributed_timeout_s", "must be > 0 (seconds)")
    need(t.heartbeat_timeout_s > 0, "heartbeat_timeout_s", "must be > 0 (seconds)")
    need(bool(str(t.workdir)), "workdir", "must name a directory")
    from sacrebleu.metrics import BLEU

    need(t.bleu_tokenize in BLEU.TOKENIZERS, "bleu_tokenize",
         f"must be one of sacreBLEU's tokenizers: {', '.join(BLEU.TOKENIZERS)}")


def evaluate_bleu(model: Transformer, params, tokenizer, pairs: list[tuple[str, str]], decode_cfg, *,
                  tokenize: str = "13a") -> tuple[dict, list[str]]:
    """Decode the sources of `pairs`; ({"bleu": cased sacreBLEU on the raw references, "bleu_lowercase": the
    same lowercased, "exact_match": fraction of outputs equal to their reference}, the outputs)."""
    from jaxformer.evaluate import bleu_scores
    from jaxformer.translate import translate_texts

    hypotheses = translate_texts(model, parallel.to_local(params), tokenizer, [s for s, _ in pairs], decode_cfg)
    references = [t for _, t in pairs]
    bleu = bleu_scores(hypotheses, references, tokenize=tokenize or None)
    exact = sum(h.strip() == r.strip() for h, r in zip(hypotheses, references)) / len(pairs)
    return {"bleu": bleu.score, "bleu_lowercase": bleu.lowercased.score, "exact_match": exact}, hypotheses



def check_shards(batches, split: str) -> None:
    """With several processes: every one's shard of `split` must hold pairs, or all stop with one error.

    Opening the shard runs its first pass (tokenizing into the cache) now. A process whose shard is empty
    would otherwise fail alone and leave the others waiting in a collective until the heartbeat timeout.
    """
    if jax.process_count() == 1:
        return
    from jaxformer.data import DataError

    try:
        size, problem = len(batches.cache), ""
    except DataError as e:
        size, problem = 0, str(e)
    sizes = parallel.allgather_ints(size)
    log.info("%s data: pairs per process %s", split, sizes)
    empty = [i for i, n in enumerate(sizes) if n == 0]
    if empty:
        raise DataError(f"the {split} data shard of process(es) {empty} of {len(sizes)} is empty (pairs per process: "
                        f"{sizes}){': ' + problem if problem else ''}; give every process data: more pairs than "
                        f"processes, or fewer processes")


# ---------------------------------------------------------------------------------------------- the loop


class _Trainer:
    """The state of one invocation of `run`: kept in one place so the loop reads top to bottom."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: pathlib.Path):
        from jaxformer.data import get_tokenizer

        self.config, self.workdir, self.t = config, workdir, config.train
        self.is_chief = jax.process_index() == 0
        if config.train.get("init_from"):  # fine-tuning: the exported model's vocabulary (jaxformer/io/init_from.py)
            self.tokenizer = init_from.run_tokenizer(config, workdir, is_chief=self.is_chief)
        else:
            self.tokenizer = get_tokenizer(config, str(workdir))
        self.model_cfg = TransformerConfig.from_dict(config.model.to_dict(), vocab_size=self.tokenizer.vocab_size)
        self.model = Transformer(self.model_cfg)
        self.mesh = parallel.make_mesh()
        self.schedule = learning_rate_schedule(self.model_cfg.d_model, self.t.warmup_steps, self.t.lr_scale)
        self.steps = Steps.from_config(self.model, self.t, self.mesh)
        self.store = ckpt.CheckpointStore(workdir / ckpt.CHECKPOINT_DIR, keep=self.t.keep_checkpoints,
                                          async_save=self.t.async_checkpointing)
        self._valid_batches = None
        self._bleu_pairs = None

    # -- data

    def train_batches(self):
        """This process's training batches, made data.prefetch batches ahead by a background thread; their
        `state_dict()` is the position after the last batch the loop took."""
        from jaxformer.data import Prefetcher, make_batches

        batches = make_batches(self.config, self.tokenizer, "train", repeat=True, shuffle=True,
                               num_devices=parallel.local_devices_in(self.mesh))
        check_shards(batches, "train")
        return Prefetcher(batches, self.config.data.prefetch) if self.config.data.prefetch > 0 else batches

    def valid_batches(self) -> list:
        if self._valid_batches is None:
            from jaxformer.data import make_batches

            batches = make_batches(self.config, self.tokenizer, "valid", repeat=False, shuffle=False,
                                   num_devices=parallel.local_devices_in(self.mesh))
            check_shards(batches, "valid")
            self._valid_batches = list(batches)
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
    nll, ppl, accuracy, bleu, bleu_lowercase) and, with train.average_last > 1, those of the averaged
    checkpoints (valid_avg_*). Raises TrainingError on a non-finite loss, ValueError / DataError on bad config or data,
    CheckpointError when no checkpoint of the workdir restores, DistributedError when the processes of a
    multi-host run cannot reach each other, and `Preempted` after SIGTERM/SIGINT stopped it (a checkpoint
    of the step it stopped after is written; calling it again resumes there).
    """
    check_train_config(config.train)
    config = init_from.resolve_config(config)  # train.init_from: that model's architecture in config.model
    check_lengths(config)  # a position table shorter than a batch would show up as a NaN loss
    TransformerConfig.from_dict(config.model.to_dict(), vocab_size=8)  # model keys, before any slow work
    every_core = config.train.cpu_data_parallel and parallel.use_every_cpu_core()  # too late once JAX runs
    parallel.maybe_initialize_distributed(config.train.distributed, timeout_s=float(config.train.distributed_timeout_s),
                                          heartbeat_timeout_s=float(config.train.heartbeat_timeout_s))
    if config.train.cpu_data_parallel and not every_core and jax.default_backend() == "cpu" \
            and jax.local_device_count() < (os.cpu_count() or 1):
        log.warning("train.cpu_data_parallel: JAX started before jaxformer.train.run with %d CPU device(s) for %d "
                    "cores, so training uses %d; call jaxformer.parallel.use_every_cpu_core() before anything "
                    "else touches JAX", jax.local_device_count(), os.cpu_count(), jax.local_device_count())
    workdir = pathlib.Path(config.train.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    with log_to_file(workdir / LOG_FILE) if jax.process_index() == 0 else contextlib.nullcontext():
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
        if t.get("init_from"):  # the exported parameters, placed as the steps keep them; Adam's moments stay zeros
            params = init_from.initial_params(config, trainer.model_cfg)
            state = state.replace(params=parallel.replicate(params, trainer.mesh))
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

    _log_packed_attention(config)

    metrics = MetricsLog(workdir, start, enabled=trainer.is_chief)
    shape_stats: dict = {}
    batches = parallel.global_batches(train_batches, trainer.mesh, shape_stats)
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
        values = summarize(sums)
        values.update(lr=float(trainer.schedule(step - 1)), grad_norm=float(fetched[-1][1]["grad_norm"]),
                      tokens_per_sec=sums["tokens"] / elapsed)
        metrics.write("train", step, values)
        if bar.disable and trainer.is_chief:
            log.info("step %d train: %s", step, fmt(values))
        bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{values['lr']:.2e}",
                        tok_s=f"{values['tokens_per_sec']:.0f}", refresh=False)
        result.update({f"train_{k}": v for k, v in values.items()})
        window_start = time.monotonic()

    def do_eval(step: int, params, split: str = "valid"):
        nonlocal window_start
        values = trainer.evaluate(params)
        metrics.write(split, step, values)
        log.info("step %d %s: %s", step, split, fmt(values))
        result.update({f"{split}_{k}": v for k, v in values.items()})
        if t.plot:
            metrics.plot()
        window_start = time.monotonic()

    try:
        redirect = logging_redirect_tqdm() if not bar.disable else contextlib.nullcontext()
        with redirect, StopSignals() as stop:  # log lines go above the progress bar
            vote = None  # several processes: the stop vote started after the previous step
            for step in range(start + 1, t.steps + 1):
                state, step_metrics = steps.update(state, [next(batches) for _ in range(accum)])
                window.append((step, step_metrics))
                if len(window) > _STEPS_AHEAD:  # bound how far the host runs ahead of the device
                    jax.block_until_ready(window[-1 - _STEPS_AHEAD][1]["loss"])
                bar.update(1)
                last = step == t.steps
                # Every process must stop after the same step, whichever got the signal: with several, they
                # vote each step and act on the vote a step later, without waiting for the device.
                if jax.process_count() == 1:
                    stopping = stop.requested
                else:
                    stopping, vote = vote is not None and bool(vote), parallel.any_process_later(stop.requested,
                                                                                                 trainer.mesh)
                save = last or stopping or (t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0)
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
                if stopping and not last:
                    trainer.store.wait()
                    name = stop.name or "a signal on another process"
                    message = (f"stopped by {name} after step {step}: checkpoint step {step} is in "
                               f"{trainer.store.directory}; rerun the same command to resume from it")
                    log.warning("%s", message)
                    raise Preempted(message, signum=stop.signum or 15, step=step)
            if start >= t.steps:
                log.info("workdir %s already holds step %d >= train.steps=%d: evaluating only", workdir, start, t.steps)
                do_eval(start, state.params)
            trainer.store.wait()
            if shape_stats.get("padded"):
                result["batches_padded_to_agree"] = shape_stats["padded"]
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
        if hasattr(train_batches, "close"):
            train_batches.close()
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
