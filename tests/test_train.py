"""Training: the paper's schedule and Adam, the smoothed loss, data-parallel steps, the loop, resume."""

from __future__ import annotations

import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxformer import checkpoint as ckpt
from jaxformer import parallel
from jaxformer.config import default_config
from jaxformer.data import PAD_ID, ensure_synthetic, make_batches
from jaxformer.model import Transformer, TransformerConfig
from jaxformer.loss import token_statistics
from jaxformer.optim import learning_rate_schedule, make_optimizer
from jaxformer.run_config import load_run_config, save_run_config
from jaxformer.steps import Steps
import jaxformer
from jaxformer.config import ALL_SENTENCES, check_train_config, load_recipe
from jaxformer.train import TrainingError, run
from jaxformer.validation import bleu_pairs
from helpers import records_of, tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------- fixtures


def train_records(workdir) -> dict[int, dict]:
    by_step = {}
    for r in records_of(workdir, "train"):
        assert r["step"] not in by_step, f"step {r['step']} logged twice"
        by_step[r["step"]] = r
    return by_step


def losses(workdir, steps) -> np.ndarray:
    records = train_records(workdir)
    assert sorted(records) == list(range(1, steps + 1))
    return np.asarray([records[s]["loss"] for s in range(1, steps + 1)])


# ------------------------------------------------------------------------------- schedule and optimizer


def test_schedule_is_the_papers():
    lr = learning_rate_schedule(512, 4000)
    at = lambda step: float(lr(step - 1))  # noqa: E731  (optax passes the count of updates done)
    peak = 512 ** -0.5 * 4000 ** -0.5
    assert at(4000) == pytest.approx(7.0e-4, abs=0.02e-4) and at(4000) == pytest.approx(peak, rel=1e-6)
    assert at(1) > 0 and at(1) == pytest.approx(peak / 4000, rel=1e-5)  # the first update is not wasted at lr 0
    assert at(1000) == pytest.approx(peak / 4, rel=1e-5)  # linear warmup
    assert at(16000) == pytest.approx(peak / 2, rel=1e-5)  # then ∝ step^-0.5
    counts = np.arange(0, 20000)
    assert int(np.argmax(np.asarray(lr(counts)))) == 3999
    assert float(learning_rate_schedule(512, 4000, scale=2.0)(3999)) == pytest.approx(2 * peak, rel=1e-6)
    assert float(learning_rate_schedule(1024, 4000)(3999)) == pytest.approx(1024 ** -0.5 * 4000 ** -0.5, rel=1e-6)


def test_optimizer_is_adam_098_1e9_on_the_schedule_with_optional_clipping():
    cfg = default_config().train
    cfg.warmup_steps = 10
    schedule = learning_rate_schedule(64, 10)
    tx = make_optimizer(cfg, 64)
    params = {"w": jnp.asarray([1.0, -2.0, 0.5])}
    grads = [np.asarray([0.1, -0.3, 2.0]), np.asarray([0.2, 0.1, -1.0]), np.asarray([0.0, 0.5, 0.3])]
    state = tx.init(params)
    m = v = np.zeros(3)
    expected = np.asarray(params["w"], np.float64)
    for t, g in enumerate(grads, 1):  # Adam by hand: β1 0.9, β2 0.98, ε 1e-9
        m = 0.9 * m + 0.1 * g
        v = 0.98 * v + 0.02 * g * g
        expected = expected - float(schedule(t - 1)) * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.98 ** t)) + 1e-9)
        updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(params["w"], expected, rtol=1e-5)

    cfg.grad_clip_norm = 1.0
    clipped = make_optimizer(cfg, 64)
    big = {"w": jnp.asarray([30.0, 40.0, 0.0])}  # norm 50 -> scaled to norm 1
    # Adam's first step is scale-free, so look at the second moment the clipped gradient leaves behind.
    _, clip_state = clipped.update(big, clipped.init(big), big)
    np.testing.assert_allclose(clip_state[1][0].nu["w"], 0.02 * np.asarray([0.6, 0.8, 0.0]) ** 2, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- loss


def test_label_smoothing_matches_a_hand_computation():
    logits = np.asarray([[[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 0.4], [5.0, -5.0, 0.0, 1.0]]], np.float32)
    targets = np.asarray([[1, 3, PAD_ID]])
    weights = targets != PAD_ID
    eps, vocab = 0.1, 4
    expected_loss, expected_nll = 0.0, 0.0
    for t in range(2):  # the third position is padding: no loss
        p = np.exp(logits[0, t]) / np.exp(logits[0, t]).sum()
        q = np.full(vocab, eps / (vocab - 1))
        q[targets[0, t]] = 1 - eps
        expected_loss += float(np.sum(q * (np.log(q) - np.log(p))))  # KL(q || p) = H(q, p) - H(q)
        expected_nll += -math.log(p[targets[0, t]])
    smoothed, nll, _ = token_statistics(jnp.asarray(logits), jnp.asarray(targets), eps)
    assert float(jnp.sum(smoothed * weights)) == pytest.approx(expected_loss, rel=1e-5)
    assert float(jnp.sum(nll * weights)) == pytest.approx(expected_nll, rel=1e-5)
    # The minimum (0) is at p = q, and without smoothing the loss is the plain negative log-likelihood.
    q_logits = jnp.log(jnp.asarray([[eps / 3, 1 - eps, eps / 3, eps / 3]]))
    assert float(token_statistics(q_logits, jnp.asarray([1]), eps)[0][0]) == pytest.approx(0.0, abs=1e-6)
    plain, _, _ = token_statistics(jnp.asarray(logits), jnp.asarray(targets), 0.0)
    assert float(jnp.sum(plain * weights)) == pytest.approx(expected_nll, rel=1e-5)



@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_loss_gradient_equals_autodiff_of_the_textbook_formula(smoothing, dtype):
    # token_statistics' hand-written backward pass (softmax - q in one pass) against jax.grad of
    # log_softmax + take_along_axis, for any mix of cotangents on the smoothed loss and the nll.
    logits = (3 * jax.random.normal(jax.random.key(0), (3, 5, 11))).astype(dtype)
    targets = jax.random.randint(jax.random.key(1), (3, 5), 0, 11)
    w_loss, w_nll = jax.random.uniform(jax.random.key(2), (2, 3, 5))

    def textbook(x):
        log_probs = jax.nn.log_softmax(x.astype(jnp.float32), axis=-1)
        true = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        low = smoothing / 10
        smoothed = -((1 - smoothing) * true + low * (jnp.sum(log_probs, axis=-1) - true))
        return jnp.sum(w_loss * smoothed) - jnp.sum(w_nll * true)

    def fused(x):
        smoothed, nll, _ = token_statistics(x, targets, smoothing)
        return jnp.sum(w_loss * smoothed) + jnp.sum(w_nll * nll)

    grad = jax.grad(fused)(logits)
    assert grad.dtype == dtype
    np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(jax.grad(textbook)(logits), np.float32),
                               atol=1e-6 if dtype == jnp.float32 else 1e-2)
    correct = token_statistics(logits, targets, smoothing)[2]
    np.testing.assert_array_equal(correct, jnp.argmax(logits, axis=-1) == targets)


# ------------------------------------------------------------------------------------------------ steps


def tiny_model(**overrides) -> Transformer:
    settings = dict(vocab_size=1000, d_model=64, d_ff=128, num_heads=4, num_encoder_layers=1,
                    num_decoder_layers=1, max_len=64)
    settings.update(overrides)
    return Transformer(TransformerConfig(**settings))


@pytest.fixture(scope="module")
def multi30k_batches(multi30k_dir, multi30k_tokenizer, tmp_path_factory):
    """Real Multi30k training batches (rows divisible by 4 devices)."""
    c = default_config()
    c.data.cache_dir = str(tmp_path_factory.mktemp("token_cache"))
    c.data.update(source="files", train_files=str(multi30k_dir / "train"), tokens_per_batch=512,
                  bucket_lengths=(32,), max_len=32)  # one shape: one compile per step
    it = make_batches(c, multi30k_tokenizer, "train", repeat=True, shuffle=True, num_devices=4,
                      process_index=0, process_count=1)
    return [next(it) for _ in range(40)]


def assert_same_params(a, b):
    """Equal up to float rounding, except attention key biases: softmax ignores them (their true gradient is
    0), so Adam (ε 1e-9) turns the rounding noise of their gradients, which differs with the summation
    order, into ±lr steps."""
    flat_b = dict(jax.tree_util.tree_leaves_with_path(b))
    for path, leaf in jax.tree_util.tree_leaves_with_path(a):
        name = jax.tree_util.keystr(path)
        if "['key']['bias']" not in name:
            np.testing.assert_allclose(leaf, flat_b[path], rtol=1e-4, atol=1e-4, err_msg=name)


def paper_train_cfg(**overrides):
    cfg = default_config().train
    cfg.update(warmup_steps=10, lr_scale=2.0)
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def steps4():
    """The steps of a tiny model without dropout on the 4-device mesh, shared so they compile once."""
    return Steps(tiny_model(dropout_rate=0.0), make_optimizer(paper_train_cfg(), 64), parallel.make_mesh(),
                 label_smoothing=0.1)


def test_a_few_steps_lower_the_loss_on_multi30k(multi30k_batches, steps4):
    steps, mesh = steps4, steps4.mesh
    state = steps.init_state(0)
    held_out = multi30k_batches[-4:]
    before = steps.evaluate(state.params, [parallel.shard_batch(held_out[0], mesh)])
    for batch in multi30k_batches[:-4]:
        state, metrics = steps.update(state, [parallel.shard_batch(batch, mesh)])
    after = steps.evaluate(state.params, [parallel.shard_batch(held_out[0], mesh)])
    nll_before, nll_after = before["nll"] / before["tokens"], after["nll"] / after["tokens"]
    assert nll_before > 6.0  # about ln(1000): an untrained model
    assert nll_after < nll_before - 1.0, (nll_before, nll_after)  # perplexity down more than e-fold
    assert int(state.step) == len(multi30k_batches) - 4


def test_one_device_and_four_devices_give_the_same_losses(multi30k_batches):
    """Same global batches, same seed (dropout on): a 1-device and a 4-device mesh agree."""
    assert jax.device_count() >= 4, "conftest forces 4 CPU devices"
    model = tiny_model(dropout_rate=0.1)
    tx = make_optimizer(paper_train_cfg(), 64)
    results = []
    for devices in (jax.devices()[:1], jax.devices()[:4]):
        mesh = parallel.make_mesh(devices)
        steps = Steps(model, tx, mesh, label_smoothing=0.1)
        state = steps.init_state(0)
        per_step = []
        for batch in multi30k_batches[:3]:
            sharded = parallel.shard_batch(batch, mesh)
            assert len(sharded["src"].sharding.device_set) == len(devices)
            state, metrics = steps.update(state, [sharded])
            per_step.append(float(metrics["loss"] / metrics["tokens"]))
        leaf = jax.tree.leaves(state.params)[0]
        assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == len(devices)
        results.append((np.asarray(per_step), jax.device_get(state.params)))
    (loss_1, params_1), (loss_4, params_4) = results
    np.testing.assert_allclose(loss_4, loss_1, rtol=2e-5)
    assert loss_1[-1] < loss_1[0]
    assert_same_params(params_1, params_4)


def test_gradient_accumulation_equals_one_big_batch(multi30k_batches, steps4):
    """Two micro-batches of 4 rows make the same update as their 8 rows at once (loss summed over tokens)."""
    steps, mesh = steps4, steps4.mesh
    batch = {k: v[:8] for k, v in multi30k_batches[0].items()}
    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
    assert (halves[0]["tgt_out"] != PAD_ID).sum() != (halves[1]["tgt_out"] != PAD_ID).sum()  # unequal tokens
    big, big_metrics = steps.update(steps.init_state(0), [parallel.shard_batch(batch, mesh)])
    acc, acc_metrics = steps.update(steps.init_state(0), [parallel.shard_batch(h, mesh) for h in halves])
    assert int(acc.step) == int(big.step) == 1
    assert float(acc_metrics["loss"]) == pytest.approx(float(big_metrics["loss"]), rel=1e-5)
    assert float(acc_metrics["tokens"]) == float(big_metrics["tokens"])
    assert_same_params(jax.device_get(acc.params), jax.device_get(big.params))


def test_loops_wait_for_a_multi_device_cpu_before_its_queue_fills(multi30k_batches, steps4, monkeypatch):
    """XLA's CPU client blocks a thread of its pool when a 33rd program waits for a device; a multi-device
    program then waits for ever in its all-reduce, and XLA aborts after 40 s. So evaluation, accumulation
    and the train loop wait every parallel.CPU_PROGRAMS_IN_FLIGHT programs, with unchanged sums."""
    steps, mesh = steps4, steps4.mesh
    limit = parallel.CPU_PROGRAMS_IN_FLIGHT
    assert steps.in_flight == limit and parallel.programs_in_flight(parallel.make_mesh(jax.devices()[:1])) is None
    queued, most = [0], [0]
    for name in ("_zero_sums", "_eval", "zeros", "accumulate"):
        def counted(*args, _original=getattr(steps, name)):
            queued[0] += 1
            most[0] = max(most[0], queued[0])
            return _original(*args)
        monkeypatch.setattr(steps, name, counted)
    wait = jax.block_until_ready
    monkeypatch.setattr(jax, "block_until_ready", lambda x: (queued.__setitem__(0, 0), wait(x))[1])
    batch = parallel.shard_batch(multi30k_batches[0], mesh)
    state = steps.init_state(0)
    one = steps.evaluate(state.params, [batch])
    queued[0] = most[0] = 0
    forty = steps.evaluate(state.params, [batch] * 40)
    assert most[0] == limit  # zeros and 15 evaluations, then a wait; 16 and a wait; 9
    np.testing.assert_allclose(forty["nll"], 40 * one["nll"], rtol=1e-5)
    queued[0] = most[0] = 0
    _, metrics = steps.update(state, [batch] * 20)  # zeros + 20 micro-steps (+ apply)
    assert most[0] == limit and float(metrics["tokens"]) == 20 * float(one["tokens"])
    one_device = Steps(steps.model, steps.tx, parallel.make_mesh(jax.devices()[:1]), label_smoothing=0.1)
    # the train loop's updates in flight: 2, fewer with accumulation
    assert [one_device.updates_ahead(8, 2), steps.updates_ahead(1, 2), steps.updates_ahead(4, 2),
            steps.updates_ahead(8, 2)] == [2, 2, 1, 0]


def test_sharded_optimizer_state_updates_like_a_replicated_one(multi30k_batches, steps4, tmp_path):
    """train.shard_optimizer_state: each device keeps 1/4 of Adam's moments, the updates (one plain, one
    accumulated) are those of the replicated state, and checkpoints move between the two placements."""
    steps, mesh = steps4, steps4.mesh
    sharded = Steps(steps.model, steps.tx, mesh, label_smoothing=0.1, shard_optimizer_state=True)
    batches = [parallel.shard_batch(b, mesh) for b in multi30k_batches[:3]]
    results = []
    for s in (steps, sharded):
        state = s.init_state(0)
        state, _ = s.update(state, batches[:1])
        state, metrics = s.update(state, batches[1:3])
        results.append((state, float(metrics["loss"] / metrics["tokens"])))
    (plain, loss_plain), (split, loss_split) = results
    assert loss_split == pytest.approx(loss_plain, rel=1e-5)
    assert_same_params(jax.device_get(plain.params), jax.device_get(split.params))
    assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(split.params))
    mu = optax.tree_utils.tree_get(split.opt_state, "mu")["params"]["shared_embedding"]["embedding"]  # [vocab, d]
    assert mu.addressable_shards[0].data.shape == (mu.shape[0] // 4, mu.shape[1])
    moments = [x for x in jax.tree.leaves(split.opt_state) if x.ndim]
    assert sum(not x.sharding.is_fully_replicated for x in moments) >= 0.9 * len(moments)

    store = ckpt.CheckpointStore(tmp_path / "ck", keep=2, async_save=False)
    for step, state, other in ((1, split, steps), (2, plain, sharded)):  # and resumed with the flag flipped
        store.save(step, params=state.params, opt_state=state.opt_state, rng=state.rng, data_state={})
        target = other.abstract_state()
        restored = store.restore(step, params_like=target.params, opt_state_like=target.opt_state)
        for got, want in zip(jax.tree.leaves(restored.opt_state), jax.tree.leaves(target.opt_state)):
            assert got.sharding == want.sharding
        assert_same_params(*(jax.device_get(optax.tree_utils.tree_get(s, "nu")) for s in (restored.opt_state,
                                                                                       state.opt_state)))
    store.close()


def test_bfloat16_compute_keeps_float32_master_weights(multi30k_batches, steps4):
    mesh = steps4.mesh
    batch = parallel.shard_batch(multi30k_batches[0], mesh)
    bf16 = Steps(tiny_model(dropout_rate=0.0, dtype="bfloat16"), steps4.tx, mesh, label_smoothing=0.1)
    results = {}
    for dtype, steps in (("float32", steps4), ("bfloat16", bf16)):
        state, metrics = steps.update(steps.init_state(0), [batch])
        assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {jnp.dtype("float32")}
        results[dtype] = float(metrics["nll"] / metrics["tokens"])
    assert math.isfinite(results["bfloat16"])
    assert results["bfloat16"] == pytest.approx(results["float32"], rel=0.02)


def test_padding_a_batch_leaves_its_loss_sums_unchanged(multi30k_batches, steps4):
    """Multi-host steps pad each process's batch to a common shape; the padding must weigh nothing."""
    steps, mesh = steps4, steps4.mesh
    params = steps.init_state(0).params
    batch = multi30k_batches[0]
    rows, length = batch["src"].shape
    padded = parallel.pad_batch(batch, rows + 4, length + 8)
    assert padded["src"].shape == (rows + 4, length + 8) and not padded["tgt_out"][rows:].any()
    a = steps.evaluate(params, [parallel.shard_batch(batch, mesh)])
    b = steps.evaluate(params, [parallel.shard_batch(padded, mesh)])
    assert a["tokens"] == b["tokens"]
    assert b["nll"] == pytest.approx(a["nll"], rel=1e-5) and b["loss"] == pytest.approx(a["loss"], rel=1e-5)


def test_multihost_detection_and_modes():
    assert parallel._looks_multihost({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert parallel._looks_multihost({"SLURM_NTASKS": "4"})
    assert parallel._looks_multihost({"TPU_WORKER_HOSTNAMES": "a,b"})
    assert not parallel._looks_multihost({"SLURM_NTASKS": "1", "TPU_WORKER_HOSTNAMES": "a"})
    assert not parallel.maybe_initialize_distributed("auto", environ={})
    assert not parallel.maybe_initialize_distributed("off", environ={"SLURM_NTASKS": "8"})
    with pytest.raises(ValueError, match="train.distributed"):
        parallel.maybe_initialize_distributed("sometimes")


# ------------------------------------------------------------------------------------------- the loop


def test_bad_train_values_are_named():
    cfg = default_config().train
    cfg.steps = 0
    with pytest.raises(ValueError, match=r"train.steps=0: must be >= 1"):
        check_train_config(cfg)
    cfg = default_config().train
    cfg.average_last = 8
    with pytest.raises(ValueError, match=r"train.average_last=8: cannot average more.*keep_checkpoints=5"):
        check_train_config(cfg)
    cfg = default_config().train
    cfg.bleu_tokenize = "words"
    with pytest.raises(ValueError, match="train.bleu_tokenize"):
        check_train_config(cfg)
    cfg = default_config().train
    cfg.eval_bleu_sentences = -2
    with pytest.raises(ValueError, match=r"^train.eval_bleu_sentences=-2: must be -1 \(all validation sentences\), "
                                         r"0 \(no BLEU\) or N > 0 \(the first N\)$") as info:
        check_train_config(cfg)
    assert "\n" not in str(info.value)


def test_validation_decodes_all_of_val_by_default_or_the_first_n(multi30k_dir):
    config = default_config()
    config.data.update(source="files", src_lang="en", tgt_lang="de", valid_files=str(multi30k_dir / "val"))
    english = (multi30k_dir / "val.en").read_text(encoding="utf-8").splitlines()
    german = (multi30k_dir / "val.de").read_text(encoding="utf-8").splitlines()
    assert config.train.eval_bleu_sentences == ALL_SENTENCES
    check_train_config(config.train)
    pairs = bleu_pairs(config)
    assert len(pairs) == len(english) == 1014 and pairs[-1] == (english[-1].strip(), german[-1].strip())
    config.train.eval_bleu_sentences = 5
    assert bleu_pairs(config) == [(e.strip(), d.strip()) for e, d in zip(english[:5], german[:5])]
    config.train.eval_bleu_sentences = 0
    assert bleu_pairs(config) == []


def test_cli_rejects_unknown_keys():
    proc = subprocess.run([sys.executable, "train.py", "--config.train.stpes=5"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "unknown config key 'stpes'" in proc.stderr and "did you mean 'steps'?" in proc.stderr


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, synthetic_setup):
    """14 uninterrupted steps, with validation BLEU (on all 100 validation pairs), curves and averaging at the end."""
    workdir = tmp_path_factory.mktemp("reference")
    config = tiny_config(workdir, synthetic_setup, steps=14, eval_bleu_sentences=ALL_SENTENCES, plot=True,
                         average_last=3)
    config.decode.update(beam_size=2, max_extra_len=5)
    return workdir, run(config)


def test_run_writes_the_workdir_layout(reference_run):
    workdir, result = reference_run
    assert result["step"] == 14
    for key in ("train_loss", "train_nll", "train_ppl", "train_tokens_per_sec", "valid_loss", "valid_ppl",
                "valid_bleu", "valid_exact_match", "valid_avg_nll", "valid_avg_bleu"):
        assert math.isfinite(result[key]), key
    assert result["valid_ppl"] == pytest.approx(math.exp(result["valid_nll"]))
    saved = load_run_config(workdir)
    assert saved.train.steps == 14 and saved.model.d_model == 32
    assert (workdir / "vocab.model").is_file()
    assert ckpt.CheckpointStore(workdir / "checkpoints", read_only=True).steps == [6, 8, 10, 12, 14]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 15))
    assert {"loss", "nll", "ppl", "lr", "tokens_per_sec", "grad_norm"} <= set(train[0])
    assert train[0]["lr"] == pytest.approx(float(learning_rate_schedule(32, 4, 2.0)(0)))
    assert [r["split"] for r in records if r["split"] != "train"] == ["valid", "end", "valid_avg"]
    # Each validation decodes every validation pair and records what it cost; so does the run's summary.
    valid_lines = (pathlib.Path(ensure_synthetic(saved.data)) / "valid.en").read_text(encoding="utf-8").splitlines()
    validations = [r for r in records if r["split"] in ("valid", "valid_avg")]
    assert [r["eval_sentences"] for r in validations] == [len(valid_lines)] * 2 == [100] * 2
    assert all(r["eval_seconds"] > 0 and 0 < r["eval_share"] < 1 for r in validations)
    assert result["eval_seconds"] == pytest.approx(sum(r["eval_seconds"] for r in validations), abs=0.1)
    assert 0 < result["eval_share"] < 1
    log_text = (workdir / "train.log").read_text()
    assert "step 14 valid: " in log_text and "eval_sentences 100, eval_seconds " in log_text
    assert "of the run so far" in log_text and '"eval_share": ' in log_text
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert (workdir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "resumed" not in (workdir / "train.log").read_text()
    # The final model loads in one call and is the averaged one's equal in shape.
    model, params, tokenizer = jaxformer.load(workdir, average_last=3)
    assert model.config.d_model == 32 and tokenizer.vocab_size == model.config.vocab_size


def test_stop_then_resume_gives_the_same_losses(tmp_path, synthetic_setup, reference_run):
    reference = losses(reference_run[0], 14)
    assert reference[-1] < reference[0]
    run(tiny_config(tmp_path, synthetic_setup, steps=7))  # checkpoint at 6 and (the last step) 7
    result = run(tiny_config(tmp_path, synthetic_setup, steps=14))
    assert "resumed from checkpoint step 7" in (tmp_path / "train.log").read_text()
    np.testing.assert_allclose(losses(tmp_path, 14), reference, rtol=1e-5)
    assert result["step"] == 14
    # Resuming with another model is refused, and neither the checkpoints nor config.json are touched.
    other = tiny_config(tmp_path, synthetic_setup, steps=20)
    other.model.d_ff = 48
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"different model.*saved \(32, 64\), config \(32, 48\)"):
        run(other)
    assert load_run_config(tmp_path).model.d_ff == 64
    assert ckpt.CheckpointStore(tmp_path / "checkpoints", read_only=True).steps[-1] == 14


def test_killed_then_resumed_run_gives_the_same_losses(tmp_path, synthetic_setup, reference_run):
    """SIGKILL a real `python train.py` mid-run, rerun it: the losses are the uninterrupted run's."""
    workdir = tmp_path / "run"
    config_dir = tmp_path / "config"
    save_run_config(tiny_config(workdir, synthetic_setup, steps=1000), config_dir)
    recipe = tmp_path / "recipe.py"
    recipe.write_text("from jaxformer.run_config import load_run_config\n\n\n"
                      f"def get_config():\n    return load_run_config({str(config_dir)!r})\n")
    log_file = open(tmp_path / "stdout.txt", "w")
    proc = subprocess.Popen([sys.executable, "train.py", "--config", str(recipe)], cwd=REPO, stdout=log_file,
                            stderr=subprocess.STDOUT, env=dict(os.environ))
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 150
    try:
        while True:
            assert proc.poll() is None, (tmp_path / "stdout.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "the training subprocess made no progress"
            if metrics.exists() and any(json.loads(line)["step"] >= 9 for line in metrics.read_text().splitlines()
                                        if line.endswith("}")):
                break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log_file.close()
    kept = ckpt.CheckpointStore(workdir / "checkpoints", read_only=True).steps
    assert kept and kept[-1] >= 4  # killed mid-run, past a few checkpoints (the newest may be half-written)
    run(tiny_config(workdir, synthetic_setup, steps=14))
    np.testing.assert_allclose(losses(workdir, 14), losses(reference_run[0], 14), rtol=1e-5)
    # The records the killed run wrote past its last checkpoint are set aside, not lost.
    assert (workdir / "metrics.dropped.jsonl").read_text().strip()


def _recipe_for(config, tmp_path) -> pathlib.Path:
    """A recipe file that returns `config` (saved as JSON), for `python train.py --config`."""
    config_dir = tmp_path / "config"
    save_run_config(config, config_dir)
    recipe = tmp_path / "recipe.py"
    recipe.write_text("from jaxformer.run_config import load_run_config\n\n\n"
                      f"def get_config():\n    return load_run_config({str(config_dir)!r})\n")
    return recipe


def test_sigterm_saves_the_current_step_and_rerunning_resumes_exactly(tmp_path, synthetic_setup, reference_run):
    """A preempted `python train.py` (SIGTERM) saves the step it was in, says how to resume, exits 143."""
    workdir = tmp_path / "run"
    recipe = _recipe_for(tiny_config(workdir, synthetic_setup, steps=1000, checkpoint_every_steps=1000), tmp_path)
    command = [sys.executable, "train.py", "--config", str(recipe)]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ))
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 150
    try:
        while not (metrics.exists() and any(json.loads(line)["step"] >= 3 for line in metrics.read_text().splitlines()
                                            if line.endswith("}"))):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the training subprocess made no progress"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM == 143, stderr[-3000:]
    stopped = max(train_records(workdir))  # the last step it logged is the step it saved
    assert 3 <= stopped < 14
    assert ckpt.CheckpointStore(workdir / "checkpoints", read_only=True).steps == [stopped]  # none periodic
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"stopped by SIGTERM after step {stopped}: checkpoint step {stopped} is in ")
    python = os.path.basename(sys.executable)  # the interpreter the user ran, e.g. python3
    assert last_line.endswith(f"rerun the same command to resume from it: {python} train.py --config {recipe}")
    # The same command (here with train.steps=14) resumes from that exact step and data position.
    run(tiny_config(workdir, synthetic_setup, steps=14))
    assert f"resumed from checkpoint step {stopped} " in (workdir / "train.log").read_text()
    np.testing.assert_allclose(losses(workdir, 14), losses(reference_run[0], 14), rtol=1e-5)
    assert not (workdir / "metrics.dropped.jsonl").exists()  # nothing past the checkpoint was logged


def test_stop_signals_are_handled_only_inside_and_restored_after():
    from jaxformer.preemption import StopSignals

    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs at the next bytecode
        assert stop.requested and stop.name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):  # a second signal, SIGINT: stop at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGTERM) == before


def test_the_stop_vote_is_true_when_any_flag_is_and_readable_later():
    mesh = parallel.make_mesh()  # every (forced CPU) device; the multi-process vote runs in test_multihost
    yes, no = parallel.any_process_later(True, mesh), parallel.any_process_later(False, mesh)
    assert yes.sharding.is_fully_replicated and bool(yes) and not bool(no)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, synthetic_setup):
    run(tiny_config(tmp_path, synthetic_setup, steps=4))
    with pytest.raises(TrainingError, match=r"non-finite training loss at step \d+.*last good checkpoint is step 4"):
        run(tiny_config(tmp_path, synthetic_setup, steps=10, lr_scale=1e30))
    store = ckpt.CheckpointStore(tmp_path / "checkpoints", read_only=True)
    assert store.steps == [2, 4]
    params, _ = ckpt.load_averaged(tmp_path)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))


def test_recipes_load_and_hold_the_papers_settings():
    def load(name):
        config = load_recipe(REPO / "configs" / f"{name}.py")
        check_train_config(config.train)
        TransformerConfig.from_dict(config.model.to_dict(), vocab_size=config.data.vocab_size)
        return config

    default = load("default")
    assert default.data.source == "synthetic"
    multi30k = load("multi30k")
    assert multi30k.data.source == "hub" and multi30k.data.hub_name == "bentrevett/multi30k"
    assert pathlib.Path(multi30k.data.train_files + ".en").is_file()  # one override away: data.source=files
    for name, d_model, steps, average, dropout in (("wmt14_base", 512, 100_000, 5, 0.1),
                                                   ("wmt14_big", 1024, 300_000, 20, 0.3)):
        c = load(name)
        assert (c.model.d_model, c.train.steps, c.train.average_last, c.model.dropout_rate) == \
            (d_model, steps, average, dropout)
        assert (c.train.warmup_steps, c.train.adam_b2, c.train.label_smoothing) == (4000, 0.98, 0.1)
        assert c.data.tokens_per_batch * c.train.grad_accum_steps >= 25_000 and c.data.vocab_size == 37_000
