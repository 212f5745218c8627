"""Two real processes on this machine, each with 2 CPU devices, training through `jax.distributed`.

Each test starts `python train.py` twice (process 0 hosts the coordinator on 127.0.0.1 and a free port;
CPU collectives over gloo) and compares with a 1-process, 4-device run of the same global batches. Every
subprocess has a timeout, so a hang fails the test instead of stalling it. Safe under `pytest -n 2`:
each test has its own ports and directories.

Data: data.pack=False with two bucket lengths, so the two processes are often in different buckets at
the same step and `parallel.global_batches` pads their batches to a common shape (the path under test);
the reference feeds the same per-process batches, padded alike, through one process. Batches are 2 rows
per process, so both buckets have 2 rows and there are 2 global shapes (12 and 24 long), not 3: each
shape is a compile, and compiles are most of the time here. The processes share a persistent
compilation cache, so the runs after the first mostly load their programs.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxformer import checkpoint as ckpt
from jaxformer import parallel
from jaxformer.config import default_config
from jaxformer.data import TokenCache, Tokenizer, make_batches
from jaxformer.run_config import save_run_config
from jaxformer.train import _Trainer, run

from conftest import FAST_COMPILE, REPO
from helpers import records_of

STEPS = 10
TIMEOUT = 300  # seconds for any one 2-process run (the shared 2-core machine can be very loaded); a hang fails the test

# One xdist worker runs the whole file (conftest schedules groups together), so the 2-process run and
# its reference are made once, while the other worker runs other tests.
pytestmark = pytest.mark.xdist_group("multihost")


# --------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The offline task's files (2,000 pairs) and a small vocabulary, made once."""
    base = tmp_path_factory.mktemp("multihost_data")
    config = default_config()
    config.data.update(source="synthetic", synthetic_size=2000, synthetic_dir=str(base / "data"))
    from jaxformer.data import ensure_synthetic

    folder = pathlib.Path(ensure_synthetic(config.data))
    sentences = []
    for lang in ("en", "de"):
        sentences += (folder / f"train.{lang}").read_text(encoding="utf-8").splitlines()
    tokenizer = Tokenizer.train(sentences, 120, str(base / "vocab.model"))
    return str(base / "data"), tokenizer.path


def small_config(workdir, setup, **train):
    data_dir, vocab = setup
    c = default_config()
    c.model.update(d_model=32, d_ff=64, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, max_len=32)
    c.data.update(source="synthetic", synthetic_size=2000, synthetic_dir=data_dir, vocab_model=vocab,
                  tokens_per_batch=48, bucket_lengths=(12, 24), max_len=24, pack=False)
    c.train.update(workdir=str(workdir), steps=STEPS, warmup_steps=4, lr_scale=2.0, log_every=1, eval_every=0,
                   eval_bleu_sentences=8, bleu_tokenize="char", checkpoint_every_steps=2, keep_checkpoints=10,
                   average_last=1, progress_bar=False, plot=False)
    c.train.update(train)
    c.decode.update(beam_size=2, max_extra_len=5)
    return c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LATE_CLOCK = """
import itertools, runpy, time
import jaxformer.train
readings = itertools.count()
jaxformer.train._clock = lambda: time.monotonic() + (1e6 if next(readings) else 0.0)
runpy.run_path("train.py", run_name="__main__")
"""


def launch(config, tmp_path, name: str, processes: int = 2,
           late_clock: tuple[int, ...] = ()) -> list[tuple[subprocess.Popen, pathlib.Path]]:
    """Start `python train.py` as `processes` processes of one jax.distributed job; (process, its log).
    The processes in `late_clock` run train.py with a clock that jumps a million seconds ahead after its
    first reading (the run's start), so their train.stop_after_minutes is spent at the first check."""
    folder = tmp_path / name
    folder.mkdir()
    save_run_config(config, folder / "config")
    recipe = folder / "recipe.py"
    recipe.write_text("from jaxformer.run_config import load_run_config\n\n\n"
                      f"def get_config():\n    return load_run_config({str(folder / 'config')!r})\n")
    compile_cache = pathlib.Path(config.data.synthetic_dir).parent / "jax_cache"  # shared by the module's runs
    port = free_port()
    started = []
    for i in range(processes):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {FAST_COMPILE}",
                   JAX_PLATFORMS="cpu",
                   JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i), PYTHONPATH=str(REPO),
                   PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=str(compile_cache),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
        log = folder / f"process{i}.log"
        with open(log, "w") as out:
            program = ["-c", LATE_CLOCK] if i in late_clock else ["train.py"]
            proc = subprocess.Popen([sys.executable, *program, "--config", str(recipe)], cwd=REPO, env=env,
                                    stdout=out, stderr=subprocess.STDOUT)
        started.append((proc, log))
    return started


def finish(started, timeout=TIMEOUT) -> list[tuple[int, str]]:
    """Wait for every process (killing all on timeout); (exit code, output) of each."""
    deadline = time.monotonic() + timeout
    try:
        for proc, _ in started:
            proc.wait(timeout=max(1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail("a process did not finish in time:\n" + "\n".join(log.read_text()[-2000:] for _, log in started))
    finally:
        for proc, _ in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [(proc.returncode, log.read_text()) for proc, log in started]


def train_losses(workdir) -> dict[int, float]:
    losses = {}
    for record in records_of(workdir, "train"):
        assert record["step"] not in losses, f"step {record['step']} logged twice"
        losses[record["step"]] = record["loss"]
    return losses


class _ShardsTogether:
    """The global batches of 2 processes, made in one process: each process's own batch iterator (its
    shard, 2 devices), padded to their common shape and stacked in process order, as the mesh lays them."""

    def __init__(self, config, tokenizer):
        self.parts = [make_batches(config, tokenizer, "train", repeat=True, shuffle=True, num_devices=2,
                                   process_index=i, process_count=2) for i in range(2)]
        self.shapes = []

    def __iter__(self):
        return self

    def __next__(self):
        batches = [next(part) for part in self.parts]
        shapes = [b["src"].shape for b in batches]
        self.shapes.append(shapes)
        rows, length = max(r for r, _ in shapes), max(n for _, n in shapes)
        padded = [parallel.pad_batch(b, rows, length) for b in batches]
        return {k: np.concatenate([p[k] for p in padded]) for k in padded[0]}

    def state_dict(self):
        return [part.state_dict() for part in self.parts]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, setup):
    """An uninterrupted 2-process run of STEPS steps, and the 1-process, 4-device run of its batches."""
    tmp = tmp_path_factory.mktemp("two_process")
    # Validations at STEPS / 2 and STEPS choose a best step (train.keep_best: every validation saves).
    chooses = {"eval_every": STEPS // 2, "keep_best": 1, "best_metric": "nll"}
    results = finish(launch(small_config(tmp / "run", setup, **chooses), tmp, "uninterrupted"))
    for code, output in results:
        assert code == 0, output[-3000:]

    assert jax.process_count() == 1 and jax.device_count() == 4  # conftest: one process, 4 CPU devices
    reference = small_config(tmp / "reference", setup, **chooses)
    made = []

    def train_batches(trainer):
        made.append(_ShardsTogether(trainer.config, trainer.tokenizer))
        return made[-1]

    original = _Trainer.train_batches
    _Trainer.train_batches = train_batches
    try:
        run(reference)
    finally:
        _Trainer.train_batches = original
    return tmp, results, made[0].shapes


# ---------------------------------------------------------------------------------------------- tests


def test_two_processes_train_like_one_process_on_the_same_global_batches(two_process_run):
    tmp, results, shapes = two_process_run
    two, one = train_losses(tmp / "run"), train_losses(tmp / "reference")
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one], rtol=2e-5)
    assert one[STEPS] < one[1]
    log0, log1 = results[0][1], results[1][1]
    assert "4 device(s) over 2 process(es)" in log0
    assert "jax.distributed initialised: process 1 of 2, 2 local / 4 global devices" in log1
    # The processes were in different length buckets at the same step, and padded to agree.
    differing = [i + 1 for i, (a, b) in enumerate(shapes[:STEPS]) if a != b]
    assert differing, f"the processes never differed in shape: {shapes}"
    assert "the processes' batches differ in shape" in log0
    assert f'"batches_padded_to_agree": {len(differing)}' in log0


def test_the_processes_agree_on_the_best_step(two_process_run):
    """Process 0's validation value decides the best step on every process: both log the same choice, the
    one metrics.jsonl records, and it is the step of the lower validation nll."""
    tmp, results, _ = two_process_run
    said = [[line.split("stopped: ", 1)[1] for line in output.splitlines() if "stopped: " in line]
            for _, output in results]
    assert len(said[0]) == 1 and said[0] == said[1], said
    valid = records_of(tmp / "run", "valid")
    assert [r["step"] for r in valid] == [STEPS // 2, STEPS]
    best = min(valid, key=lambda r: (r["nll"], r["step"]))["step"]
    assert valid[-1]["best_step"] == best and f"best step {best} with nll" in said[0][0]
    assert said[0][0].startswith(f"step {STEPS} of train.steps={STEPS} reached")


def test_each_process_reads_its_own_disjoint_shard_and_together_all_data(two_process_run, setup):
    tmp, results, _ = two_process_run
    caches = tmp / "run" / "data_cache"

    def pairs(key_prefix):
        (path,) = caches.glob(f"{key_prefix}-*")
        cache = TokenCache.open(str(path))
        return [(tuple(cache.src_tokens[cache.src_offsets[i]:cache.src_offsets[i + 1]]),
                 tuple(cache.tgt_tokens[cache.tgt_offsets[i]:cache.tgt_offsets[i + 1]])) for i in range(len(cache))]

    shard0, shard1 = pairs("train-0of2"), pairs("train-1of2")
    assert abs(len(shard0) - len(shard1)) <= 1 and len(shard0) + len(shard1) == 2000
    # Every pair of the whole split, tokenized by one process, is in exactly one shard (the task's
    # numbers are distinct, so pairs are too).
    config = small_config(tmp / "whole", setup)
    whole = make_batches(config, Tokenizer.load(setup[1]), "train", repeat=False, shuffle=False,
                         process_index=0, process_count=1).cache
    everything = [(tuple(whole.src_tokens[whole.src_offsets[i]:whole.src_offsets[i + 1]]),
                   tuple(whole.tgt_tokens[whole.tgt_offsets[i]:whole.tgt_offsets[i + 1]])) for i in range(len(whole))]
    assert len(set(everything)) == len(everything) == 2000
    assert not set(shard0) & set(shard1)
    assert sorted(shard0 + shard1) == sorted(everything)
    assert "train data: pairs per process [1000, 1000]" in results[0][1]


def test_evaluation_and_bleu_in_two_processes_equal_one_process(two_process_run):
    tmp, _, _ = two_process_run
    two, one = records_of(tmp / "run", "valid")[-1], records_of(tmp / "reference", "valid")[-1]
    assert two["step"] == one["step"] == STEPS
    assert two["tokens"] == one["tokens"]  # each process evaluates its shard; the sums cover the split
    for key in ("loss", "nll", "accuracy"):
        assert two[key] == pytest.approx(one[key], rel=1e-4), key
    # BLEU: every process decodes the same sentences with its copy of the parameters. (After 10 steps the
    # model's outputs are still empty, so this equality is weak; the loss sums above are the strong check.)
    assert two["bleu"] == pytest.approx(one["bleu"], abs=1e-6)
    assert two["exact_match"] == one["exact_match"]


def test_sigkill_of_one_process_ends_the_other_and_the_checkpoint_resumes_exactly(two_process_run, setup,
                                                                                  tmp_path):
    uninterrupted = train_losses(two_process_run[0] / "run")
    workdir = tmp_path / "run"
    # heartbeat 10 s: the survivor learns of the death within it (the default is 100 s).
    started = launch(small_config(workdir, setup, steps=1000, heartbeat_timeout_s=10), tmp_path, "killed")
    (proc0, log0), (proc1, _) = started
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT
    try:
        while not (metrics.exists() and any(json.loads(line)["step"] >= 4 for line in metrics.read_text().splitlines()
                                            if line.endswith("}"))):
            assert proc0.poll() is None and proc1.poll() is None, log0.read_text()[-3000:]
            assert time.monotonic() < deadline, "the 2-process run made no progress"
            time.sleep(0.02)
        proc1.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        proc0.wait(timeout=90)  # not a hang: the survivor ends
        survivor_seconds = time.monotonic() - killed_at
    finally:
        for proc, _ in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    survivor_output = log0.read_text()
    assert proc0.returncode != 0
    # A JAX limitation: the survivor is ended by JAX's C++ coordination client (SIGABRT, 134 in a shell),
    # not by a Python exception, so its last words are JAX's, not a one-line jaxformer error.
    assert proc0.returncode == -signal.SIGABRT, (proc0.returncode, survivor_output[-3000:])
    assert "Terminating process because the JAX distributed service detected fatal errors" in survivor_output
    assert survivor_seconds < 60, survivor_seconds
    kept = ckpt.CheckpointStore(workdir / "checkpoints", read_only=True).steps
    assert kept and kept[-1] < STEPS, kept

    # The same 2-process command resumes from the last complete checkpoint, with the uninterrupted losses.
    results = finish(launch(small_config(workdir, setup), tmp_path, "resumed"))
    for code, output in results:
        assert code == 0, output[-3000:]
    assert f"resumed from checkpoint step {kept[-1]} " in results[0][1]
    resumed = train_losses(workdir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([resumed[s] for s in sorted(resumed)], [uninterrupted[s] for s in sorted(resumed)],
                               rtol=1e-6)

    # A checkpoint of 2 processes does not resume in 1: a one-line error naming both counts.
    with pytest.raises(ckpt.CheckpointError) as error:
        run(small_config(workdir, setup, steps=STEPS + 2))
    assert "was written by 2 process(es), this run has 1; resume with the same process count" in str(error.value)
    assert "\n" not in str(error.value)


def test_sigterm_to_one_process_stops_both_after_the_same_step_with_a_checkpoint(tmp_path, setup):
    """A preemption notice that reaches one process only: both finish the same step, save it, exit 143."""
    workdir = tmp_path / "run"
    started = launch(small_config(workdir, setup, steps=1000, checkpoint_every_steps=1000), tmp_path, "preempted")
    (proc0, log0), (proc1, _) = started
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT
    try:
        while not (metrics.exists() and any(json.loads(line)["step"] >= 3 for line in metrics.read_text().splitlines()
                                            if line.endswith("}"))):
            assert proc0.poll() is None and proc1.poll() is None, log0.read_text()[-3000:]
            assert time.monotonic() < deadline, "the 2-process run made no progress"
            time.sleep(0.02)
        proc1.send_signal(signal.SIGTERM)
    except BaseException:
        finish(started, timeout=1)
        raise
    (code0, out0), (code1, out1) = finish(started, timeout=90)
    assert code0 == code1 == 143, (out0[-3000:], out1[-3000:])
    stopped = max(train_losses(workdir))
    assert ckpt.CheckpointStore(workdir / "checkpoints", read_only=True).steps == [stopped]
    assert f"stopped by SIGTERM after step {stopped}: checkpoint step {stopped} is in " in out1
    assert f"stopped by a signal on another process after step {stopped}: checkpoint step {stopped}" in out0
    python = os.path.basename(sys.executable)  # the interpreter the user ran, e.g. python3
    assert f"rerun the same command to resume from it: {python} train.py --config " in out0.strip().splitlines()[-1]


def test_process_0s_clock_decides_when_the_time_budget_is_spent(tmp_path, setup):
    """train.stop_after_minutes with clocks that disagree: process 0's decides, so every process stops after
    the same step, or none does."""
    # Only process 1's budget is spent: process 0 goes on, and so does process 1, to train.steps.
    config = small_config(tmp_path / "going_on", setup, stop_after_minutes=60, checkpoint_every_steps=0)
    for code, output in finish(launch(config, tmp_path, "going_on", late_clock=(1,))):
        assert code == 0, output[-3000:]
    assert sorted(train_losses(tmp_path / "going_on")) == list(range(1, STEPS + 1))
    assert records_of(tmp_path / "going_on", "end")[-1]["reason"] == "steps"

    # Only process 0's is spent: both stop after the first check (step 1; train.log_every=1), which is saved.
    config = small_config(tmp_path / "spent", setup, stop_after_minutes=60, checkpoint_every_steps=0)
    results = finish(launch(config, tmp_path, "spent", late_clock=(0,)))
    for code, output in results:
        assert code == 0, output[-3000:]
    assert sorted(train_losses(tmp_path / "spent")) == [1]
    [end] = records_of(tmp_path / "spent", "end")
    assert end["reason"] == "time" and end["train_minutes"] > 60
    assert ckpt.CheckpointStore(tmp_path / "spent" / "checkpoints", read_only=True).steps == [1]
    for _, output in results:  # each process says so
        assert "stopped: train.stop_after_minutes=60 spent at step 1 of 10" in output, output[-3000:]


def test_a_process_with_an_empty_shard_stops_every_process_with_one_line(tmp_path, setup):
    data = tmp_path / "one_pair.tsv"
    data.write_text("one\teins\n", encoding="utf-8")
    config = small_config(tmp_path / "run", setup)
    config.data.update(source="files", train_files=str(data), valid_files=str(data))
    results = finish(launch(config, tmp_path, "empty"))
    for code, output in results:
        assert code == 1, output[-3000:]
        last = output.strip().splitlines()[-1]
        assert last.startswith("error: the train data shard of process(es) [1] of 2 is empty "
                               "(pairs per process: [1, 0])"), last
    assert "no usable examples in the data (read 0" in results[1][1]  # the empty process says what it read


def test_bad_coordinator_addresses_are_one_line_errors_within_the_timeout():
    environ = {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:%d" % free_port(), "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": "1"}
    started = time.monotonic()
    with pytest.raises(parallel.DistributedError) as error:
        parallel.maybe_initialize_distributed("auto", environ, timeout_s=2)
    assert 2 <= time.monotonic() - started < 30
    assert str(error.value).startswith(f"the coordinator {environ['JAX_COORDINATOR_ADDRESS']} "
                                       "(JAX_COORDINATOR_ADDRESS) did not answer within "
                                       "train.distributed_timeout_s=2 s")
    with pytest.raises(parallel.DistributedError, match=r"JAX_COORDINATOR_ADDRESS='nohost' is not host:port"):
        parallel.maybe_initialize_distributed("auto", {"JAX_COORDINATOR_ADDRESS": "nohost"})
    with pytest.raises(parallel.DistributedError, match=r"JAX_PROCESS_ID=2 is not in \[0, JAX_NUM_PROCESSES=2\)"):
        parallel.maybe_initialize_distributed("on", {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"})
    assert not jax.distributed.is_initialized()
