"""The training loop `run(config)` behind `python train.py`.

The pieces it drives, each in its own module: `optim` (Adam + the paper's rate), `loss` (label smoothing),
`steps` (the compiled data-parallel steps), `checkpoint` (orbax), `metrics` (logs and curves), `validation`
(what a validation decodes, and its BLEU). Read `_run` top to bottom: start (restore or init) -> for each
step: train_step, stop?, log, save, evaluate -> finish (the averaged checkpoints' evaluation). Each is a
method of `_Trainer`; what changes per step is in `_Loop`.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from jaxformer import choose, parallel
from jaxformer.config import check_lengths, check_train_config
from jaxformer.data import is_parser
from jaxformer.attention import accelerator_platform
from jaxformer.io import init_from
from jaxformer.metrics import LOG_FILE, MetricsLog, fmt, log_to_file
from jaxformer.model import Transformer, TransformerConfig, count_params
from jaxformer.optim import learning_rate_schedule
from jaxformer.preemption import Preempted, StopSignals
from jaxformer.run_config import resume_legacy_model, save_run_config
from jaxformer.steps import Steps, TrainState, evaluate_loss, summarize
from jaxformer.validation import bleu_pairs, evaluate_bleu, tok_references

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

        self.started = time.monotonic()  # the run's wall time, of which validations take a share
        self.clock_started = _clock()  # the same, for train.stop_after_minutes
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
        self.steps_ahead = self.steps.updates_ahead(int(self.t.grad_accum_steps), _STEPS_AHEAD)
        self.store = ckpt.CheckpointStore(workdir / ckpt.CHECKPOINT_DIR, keep=self.t.keep_checkpoints,
                                          keep_best=int(self.t.keep_best), async_save=self.t.async_checkpointing)
        self._valid_batches = None
        self._bleu_pairs, self.tok_refs = None, None

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
            self._bleu_pairs = bleu_pairs(self.config)
            self.tok_refs = tok_references(self.config, self._bleu_pairs)  # train.valid_tok_refs, or None
        return self._bleu_pairs

    # -- pieces of the loop

    def evaluate(self, params) -> dict:
        """Validation loss/perplexity/accuracy, and BLEU on the pairs train.eval_bleu_sentences names."""
        result = evaluate_loss(self.steps, params, self.valid_batches())
        pairs = self.bleu_pairs()
        if pairs:
            scores, hypotheses = evaluate_bleu(self.model, params, self.tokenizer, pairs, self.config.decode,
                                               tokenize=self.t.bleu_tokenize, tok_refs=self.tok_refs,
                                               lang=self.config.data.tgt_lang)
            result.update(scores, eval_sentences=len(pairs))
            log.info("sample: %r -> %r (reference %r)", pairs[0][0], hypotheses[0], pairs[0][1])
        return result

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


    # -- the loop's named steps

    def start(self) -> _Loop:
        """Restore the newest good checkpoint (with the data position) or initialise; save the config."""
        from tqdm import tqdm

        t, steps = self.t, self.steps
        if t.get("valid_tok_refs"):
            self.bleu_pairs()  # a tok refs file that does not fit the valid split fails now, not mid-training
        source = self.train_batches()
        target = steps.abstract_state()
        restored = self.store.restore_latest(params_like=target.params, opt_state_like=target.opt_state)
        if restored is None:
            state = steps.init_state(int(t.seed))
            if t.get("init_from"):  # the exported parameters, placed as the steps keep them; Adam's moments stay 0
                params = init_from.initial_params(self.config, self.model_cfg)
                state = state.replace(params=parallel.replicate(params, self.mesh))
        else:
            # Placed as the steps' outputs are, so the first update does not compile for another placement.
            step, rng = parallel.replicate((np.int32(restored.step), restored.rng), self.mesh)
            state = TrainState(step=step, params=restored.params, opt_state=restored.opt_state, rng=rng)
            positions = restored.data_state.get("processes", [])
            if len(positions) != jax.process_count():
                raise ckpt.CheckpointError(f"checkpoint step {restored.step} was written by {len(positions)} "
                                           f"process(es), this run has {jax.process_count()}; resume with the "
                                           f"same process count")
            source.load_state_dict(positions[jax.process_index()])
            log.info("resumed from checkpoint step %d in %s", restored.step, self.store.directory)
        if self.is_chief:  # only now: a config whose model does not fit the checkpoints must not replace it
            save_run_config(self.config, self.workdir)
        start = int(state.step)
        log.info("model: %s parameters, vocabulary %d; %d device(s) over %d process(es); steps %d -> %d; "
                 "workdir %s", f"{count_params(state.params):,}", self.tokenizer.vocab_size, jax.device_count(),
                 jax.process_count(), start, t.steps, self.workdir)
        _log_packed_attention(self.config)
        bar = tqdm(total=t.steps, initial=start, unit="step", dynamic_ncols=True,
                   disable=not (t.progress_bar and self.is_chief))
        self.shape_stats: dict = {}
        return _Loop(state=state, start=start, batches=parallel.global_batches(source, self.mesh, self.shape_stats),
                     source=source, metrics=MetricsLog(self.workdir, start, enabled=self.is_chief), bar=bar,
                     result={"step": start, "workdir": str(self.workdir)},
                     choice=choose.resumed(t, restored.choice if restored is not None else None,
                                           parser=is_parser(self.tokenizer)),
                     prior_seconds=restored.train_seconds if restored is not None else 0.0)

    def train_step(self, loop: _Loop, step: int) -> None:
        """One update (of train.grad_accum_steps micro-batches), without waiting for the device."""
        batches = [next(loop.batches) for _ in range(int(self.t.grad_accum_steps))]
        loop.state, step_metrics = self.steps.update(loop.state, batches)
        loop.window.append((step, step_metrics))
        if len(loop.window) > self.steps_ahead:  # bound how far the host runs ahead of the device
            jax.block_until_ready(loop.window[-1 - self.steps_ahead][1]["loss"])
        loop.bar.update(1)

    def stop_requested(self, loop: _Loop, stop: StopSignals) -> bool:
        """Whether to stop after this step. Every process must stop after the same step, whichever got the
        signal: with several, they vote each step and act on the vote a step later, not waiting for it."""
        if jax.process_count() == 1:
            return stop.requested
        stopping = loop.vote is not None and bool(loop.vote)
        loop.vote = parallel.any_process_later(stop.requested, self.mesh)
        return stopping

    def spent_seconds(self, loop: _Loop) -> float:
        """Wall-clock seconds the run has spent, start-up and validations included, over resumes."""
        return loop.prior_seconds + _clock() - self.clock_started

    def out_of_time(self, loop: _Loop, step: int) -> bool:
        """Whether train.stop_after_minutes is spent after `step`. With several processes, process 0 decides,
        every train.log_every steps (as for time-based saves)."""
        budget = 60 * float(self.t.stop_after_minutes)
        if not budget or (jax.process_count() > 1 and step % self.t.log_every):
            return False
        return _agree(self.spent_seconds(loop) >= budget)

    def save_due(self, loop: _Loop, step: int) -> bool:
        if self.t.checkpoint_every_steps and step % self.t.checkpoint_every_steps == 0:
            return True
        if self.t.checkpoint_every_minutes and step % self.t.log_every == 0:
            return _agree(time.monotonic() - loop.last_save_time >= 60 * self.t.checkpoint_every_minutes)
        return False

    def log_window(self, loop: _Loop) -> None:
        """Fetch the steps since the last log, check they are finite, and log their means."""
        fetched = jax.device_get(loop.window)
        loop.window = []
        self.check_finite(fetched)
        sums = {k: sum(float(m[k]) for _, m in fetched) for k in ("loss", "nll", "correct", "tokens")}
        step = fetched[-1][0]
        elapsed = max(time.monotonic() - loop.window_start, 1e-9)
        values = summarize(sums)
        values.update(lr=float(self.schedule(step - 1)), grad_norm=float(fetched[-1][1]["grad_norm"]),
                      tokens_per_sec=sums["tokens"] / elapsed)
        loop.metrics.write("train", step, values)
        if loop.bar.disable and self.is_chief:
            log.info("step %d train: %s", step, fmt(values))
        loop.bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{values['lr']:.2e}",
                             tok_s=f"{values['tokens_per_sec']:.0f}", refresh=False)
        loop.result.update({f"train_{k}": v for k, v in values.items()})
        loop.window_start = time.monotonic()

    def save(self, loop: _Loop) -> None:
        state = loop.state
        if not bool(self.steps.all_finite(state.params)):
            raise TrainingError(f"the parameters after step {int(state.step)} are not finite; not saving them. "
                                f"{self.last_good()} Lower train.lr_scale or set train.grad_clip_norm.")
        self.store.save(int(state.step), params=state.params, opt_state=state.opt_state, rng=state.rng,
                        data_state={"processes": parallel.allgather_json(loop.source.state_dict())},
                        choice=loop.choice, train_seconds=self.spent_seconds(loop))
        loop.last_save_time = loop.window_start = time.monotonic()

    def evaluate_and_log(self, loop: _Loop, step: int, params, split: str = "valid", choose_best: bool = False):
        """Validate; with `choose_best`, process 0's value of train.best_metric updates the best step and early
        stopping on every process (so all agree), and the record says which step is best. The record also says
        what validating cost: eval_seconds (this one), eval_share (all of them, of the run's time so far)."""
        began = time.monotonic()
        values = self.evaluate(params)
        now = time.monotonic()
        loop.eval_seconds += now - began
        values.update(eval_seconds=round(now - began, 3),
                      eval_share=round(loop.eval_seconds / max(now - self.started, 1e-9), 4))
        if choose_best:
            loop.choice.update(step, parallel.allgather_json(float(values.get(loop.choice.metric, math.nan)))[0])
            values.update(loop.choice.record())
        loop.metrics.write(split, step, values)
        log.info("step %d %s: %s", step, split, fmt(values))
        loop.result.update({f"{split}_{k}": v for k, v in values.items()})
        if self.t.plot:
            loop.metrics.plot()
        loop.window_start = time.monotonic()

    def stop(self, stop: StopSignals, step: int) -> None:
        self.store.wait()
        name = stop.name or "a signal on another process"
        message = (f"stopped by {name} after step {step}: checkpoint step {step} is in {self.store.directory}; "
                   f"rerun the same command to resume from it")
        log.warning("%s", message)
        raise Preempted(message, signum=stop.signum or 15, step=step)

    def finish(self, loop: _Loop) -> None:
        """After the last step: evaluate a run that had nothing left to do, and the averaged checkpoints."""
        t = self.t
        if loop.start >= t.steps:
            log.info("workdir %s already holds step %d >= train.steps=%d: evaluating only", self.workdir,
                     loop.start, t.steps)
            self.evaluate_and_log(loop, loop.start, loop.state.params)
        spent = self.spent_seconds(loop) / 60
        record, message = loop.choice.end(int(loop.result["step"]), int(t.steps),
                                          minutes=float(t.stop_after_minutes) if loop.timed_out else None)
        record["train_minutes"] = round(spent, 2)
        log.info("%s", message)
        loop.metrics.write("end", int(loop.result["step"]), record)
        loop.result.update(stop_reason=record["reason"], best_step=loop.choice.best_step)
        self.store.wait()
        if self.shape_stats.get("padded"):
            loop.result["batches_padded_to_agree"] = self.shape_stats["padded"]
        if t.average_last > 1:
            kept = self.store.steps
            if len(kept) >= t.average_last:
                averaged, _ = ckpt.load_averaged(self.workdir, average_last=int(t.average_last))
                self.evaluate_and_log(loop, kept[-1], parallel.replicate(averaged, self.mesh), "valid_avg")
            else:
                log.info("not evaluating averaged checkpoints: %d kept, train.average_last=%d", len(kept),
                         t.average_last)

    def close(self, loop: _Loop) -> None:
        loop.bar.close()
        if hasattr(loop.source, "close"):
            loop.source.close()
        self.store.close()
        loop.metrics.close()


def run(config: ml_collections.ConfigDict) -> dict:
    """Train as `config` says, resuming from `config.train.workdir` when it holds checkpoints.

    Returns the final metrics: step, the last training window's (train_*), validation (valid_*: loss,
    nll, ppl, accuracy, bleu, bleu_lowercase, with train.valid_tok_refs bleu_moses_lc) and, with
    train.average_last > 1, those of the averaged checkpoints (valid_avg_*); seconds, and of them eval_seconds
    validating (eval_share). Raises TrainingError on a non-finite loss, ValueError / DataError on bad config or data,
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
    resume_legacy_model(config, workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with log_to_file(workdir / LOG_FILE) if jax.process_index() == 0 else contextlib.nullcontext():
        return _run(config, workdir)


@dataclasses.dataclass
class _Loop:
    """What changes from step to step: the train state and the bookkeeping around it."""

    state: TrainState
    start: int  # the step this invocation started from
    batches: Any  # global batches, placed on the mesh
    source: Any  # this process's batch iterator (its position goes into checkpoints)
    metrics: MetricsLog
    bar: Any
    result: dict
    window: list = dataclasses.field(default_factory=list)  # (step, device metrics) not yet fetched
    window_start: float = dataclasses.field(default_factory=time.monotonic)
    last_save_time: float = dataclasses.field(default_factory=time.monotonic)
    vote: Any = None  # several processes: the stop vote started after the previous step
    choice: choose.Choice | None = None  # the best step by validation, early stopping (`jaxformer.choose`)
    eval_seconds: float = 0.0  # spent validating so far (this invocation)
    prior_seconds: float = 0.0  # wall-clock seconds spent before this invocation (the checkpoint resumed from)
    timed_out: bool = False  # stopped by train.stop_after_minutes


def _run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
    from tqdm.contrib.logging import logging_redirect_tqdm

    trainer = _Trainer(config, workdir)
    t = config.train
    loop = trainer.start()
    try:
        redirect = logging_redirect_tqdm() if not loop.bar.disable else contextlib.nullcontext()
        with redirect, StopSignals() as stop:  # log lines go above the progress bar
            spent = loop.timed_out = bool(t.stop_after_minutes) and loop.prior_seconds >= 60 * t.stop_after_minutes
            if loop.choice.should_stop:
                log.info("the run stopped early at step %d (train.early_stopping_patience=%d): nothing to train",
                         loop.choice.stopped_at, t.early_stopping_patience)
            elif spent:
                log.info("the run spent its time budget at step %d (%.1f of train.stop_after_minutes=%g): nothing "
                         "to train; raise it to go on", loop.start, loop.prior_seconds / 60, t.stop_after_minutes)
            for step in range(loop.start + 1, t.steps + 1 if not (loop.choice.should_stop or spent) else 0):
                trainer.train_step(loop, step)
                loop.timed_out = trainer.out_of_time(loop, step)
                last = step == t.steps or loop.timed_out
                stopping = trainer.stop_requested(loop, stop)
                save = last or stopping or trainer.save_due(loop, step)
                evaluate = last or bool(t.eval_every and step % t.eval_every == 0)
                if last or save or evaluate or step % t.log_every == 0:
                    trainer.log_window(loop)
                if evaluate:  # before the save, whose meta holds the choice this validation updates
                    trainer.evaluate_and_log(loop, step, loop.state.params, choose_best=True)
                early = loop.choice.stopped_at == step
                if save or early or (evaluate and t.keep_best):  # keep_best ranks the validated checkpoints
                    trainer.save(loop)
                loop.result["step"] = step
                if early or loop.timed_out:
                    break
                if stopping and not last:
                    trainer.stop(stop, step)
            trainer.finish(loop)
    except BaseException as error:
        if isinstance(error, KeyboardInterrupt):
            log.warning("interrupted at step %d. %s", int(loop.result["step"]), trainer.last_good())
        if t.plot:
            loop.metrics.plot()  # the curves up to the failure
        raise
    finally:
        trainer.close(loop)
    seconds = time.monotonic() - trainer.started
    loop.result.update(seconds=round(seconds, 1), eval_seconds=round(loop.eval_seconds, 1),
                       eval_share=round(loop.eval_seconds / max(seconds, 1e-9), 4))
    log.info("done: %s", json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                                     for k, v in loop.result.items()}))
    return loop.result


def _clock() -> float:
    """Seconds on a monotonic clock: what train.stop_after_minutes counts (tests replace it)."""
    return time.monotonic()


def _agree(flag: bool) -> bool:
    """Process 0's decision, so every process saves at the same step (time differs between hosts)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))
