"""Choosing the model by validation: the best step, early stopping, keep_best, --best / --average-best /
--average-from-best."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxformer.train  # (binds jaxformer too) the tests call jaxformer.train.run
from jaxformer import checkpoint as ckpt
from jaxformer.choose import Choice, best_first, resolve_metric, resumed
from jaxformer.cli import main as cli_main
from jaxformer.config import check_train_config, default_config
from jaxformer.io import runs

from helpers import records_of, tiny_config


def feed(choice: Choice, values, every: int = 10) -> list[bool]:
    """Validations at steps every, 2*every, ...; whether each improved."""
    return [choice.update(every * (i + 1), v) for i, v in enumerate(values)]


# ------------------------------------------------------------------------------------------ the decision


def test_early_stopping_stops_after_patience_validations_without_improvement_bleu():
    choice = Choice(metric="bleu", patience=3)
    improved = feed(choice, [10.0, 12.0, 11.0, 12.0, 11.5])  # 12.0 again is no improvement
    assert improved == [True, True, False, False, False]
    assert (choice.best_step, choice.best_value, choice.since_best) == (20, 12.0, 3)
    assert choice.stopped_at == 50 and choice.should_stop


def test_early_stopping_on_a_lower_is_better_metric():
    choice = Choice(metric="loss", patience=2)
    stops = []
    for i, value in enumerate([3.0, 2.5, 2.6, 2.4, 2.5, 2.41]):
        choice.update(i + 1, value)
        stops.append(choice.should_stop)
    assert stops == [False] * 5 + [True]  # stopped at the 6th: 2.5 and 2.41 did not beat 2.4
    assert (choice.best_step, choice.stopped_at) == (4, 6)


def test_patience_zero_never_stops_and_nan_never_improves():
    choice = Choice(metric="nll", patience=0)
    feed(choice, [5.0] + [6.0] * 50 + [math.nan])
    assert not choice.should_stop and choice.best_step == 10 and choice.since_best == 51


def test_ranking_and_its_state_survive_json():
    choice = Choice(metric="bleu", patience=4)
    feed(choice, [10.0, 14.0, 12.0, 14.0, 9.0])
    assert choice.ranked([10, 20, 30, 40, 50, 60]) == [20, 40, 30, 10, 50]  # ties: earlier first; 60 unvalidated
    state = json.loads(json.dumps(choice.state_dict()))
    again = Choice.from_state_dict(state, patience=4)
    assert again == choice
    again.update(60, 13.0)
    assert again.should_stop and again.stopped_at == 60
    # A resumed run with a larger patience goes on; one that chooses by another metric starts afresh.
    assert not Choice.from_state_dict(again.state_dict(), patience=10).should_stop
    assert Choice.from_state_dict(again.state_dict(), patience=4).stopped_at == 60
    config = default_config().train
    config.update(best_metric="nll", early_stopping_patience=4)
    assert resumed(config, state).values == {} and resumed(config, state).metric == "nll"
    config.best_metric = "bleu"
    assert resumed(config, state).best_step == 20


def test_auto_metric_is_bleu_when_validation_scores_it():
    config = default_config().train
    assert config.eval_bleu_sentences == -1 and resolve_metric(config) == "bleu"  # all of val
    config.eval_bleu_sentences = 5
    assert resolve_metric(config) == "bleu"
    config.eval_bleu_sentences = 0
    assert resolve_metric(config) == "nll"


def test_auto_metric_is_f1_for_a_parser_and_a_metric_the_model_does_not_produce_is_an_error():
    config = default_config().train
    assert resolve_metric(config, parser=True) == "f1"
    config.eval_bleu_sentences = 0
    assert resolve_metric(config, parser=True) == "nll"
    config.best_metric = "f1"
    with pytest.raises(ValueError, match=r"best_metric='f1': a translation model's validation .* by bleu, not f1$"):
        resolve_metric(config)
    config.best_metric = "bleu"
    with pytest.raises(ValueError, match=r"best_metric='bleu': a parser's validation .* by f1, not bleu$"):
        resolve_metric(config, parser=True)


@pytest.mark.parametrize("key, value, message", [
    ("best_metric", "accuracy", r"train.best_metric='accuracy': must be auto, bleu, bleu_moses_lc, f1, loss, nll$"),
    ("keep_best", -1, r"train.keep_best=-1: must be >= 0"),
    ("early_stopping_patience", -2, r"train.early_stopping_patience=-2: must be >= 0"),
])
def test_bad_choice_options_are_named_in_one_line(key, value, message):
    config = default_config().train
    config[key] = value
    with pytest.raises(ValueError, match=message) as info:
        check_train_config(config)
    assert "\n" not in str(info.value)


def test_choice_options_that_need_validation_say_so():
    config = default_config().train
    config.update(best_metric="bleu", eval_bleu_sentences=-1)
    check_train_config(config)  # all of val
    config.update(best_metric="bleu", eval_bleu_sentences=0)
    with pytest.raises(ValueError, match=r"needs validation BLEU .*: set train.eval_bleu_sentences to -1 \(all\) or "
                                         r"N > 0, or choose by loss or nll$"):
        check_train_config(config)
    config.update(best_metric="nll", eval_every=0, early_stopping_patience=3)
    with pytest.raises(ValueError, match="needs validations during training: set train.eval_every"):
        check_train_config(config)


# --------------------------------------------------------------------------------- keep_best and loading


def params_of(value: float):
    return {"params": {"w": jnp.full((2, 3), value, jnp.float32)}}


def save(store: ckpt.CheckpointStore, step: int, choice: Choice) -> None:
    params = params_of(float(step))
    store.save(step, params=params, opt_state=optax.adam(1e-3).init(params),
               rng=jax.random.key_data(jax.random.key(step)), data_state={"processes": [{}]}, choice=choice)


BLEU = {1: 5.0, 2: 9.0, 3: 7.0, 4: 8.0, 5: 6.0, 6: 4.0, 7: 3.0, 8: 8.5}  # made-up validation BLEU per step


def test_keep_best_survives_rotation_and_resume(tmp_path):
    directory = tmp_path / ckpt.CHECKPOINT_DIR
    store = ckpt.CheckpointStore(directory, keep=2, keep_best=2, async_save=True)
    choice = Choice(metric="bleu")
    for step in range(1, 6):
        choice.update(step, BLEU[step])
        save(store, step, choice)
    store.wait()
    assert store.steps == [2, 4, 5]  # the last 2 (4, 5) and the best 2 (2: 9.0, 4: 8.0)
    store.close()
    # A resumed run: the choice comes back from the newest checkpoint and rotation goes on sparing the best.
    store = ckpt.CheckpointStore(directory, keep=2, keep_best=2, async_save=True)
    params = params_of(0.0)
    restored = store.restore_latest(params_like=params, opt_state_like=optax.adam(1e-3).init(params))
    choice = Choice.from_state_dict(restored.choice)
    assert restored.step == 5 and choice.best_step == 2 and sorted(choice.values) == [1, 2, 3, 4, 5]
    for step in range(6, 9):
        choice.update(step, BLEU[step])
        save(store, step, choice)
    store.wait()
    assert store.steps == [2, 7, 8]  # the last 2 (7, 8) and the best 2 (2: 9.0, 8: 8.5)
    store.close()
    # Without keep_best, rotation is orbax's: the last `keep` only.
    plain = ckpt.CheckpointStore(tmp_path / "plain", keep=2, async_save=False)
    for step in range(1, 5):
        save(plain, step, Choice(metric="bleu"))
    assert plain.steps == [3, 4]
    plain.close()


def kernel(loaded) -> float:
    return float(np.asarray(loaded[0]["params"]["w"])[0, 0])


def validated_run(directory, *, keep: int, keep_best: int) -> tuple[list[int], Choice]:
    """Steps 1-8 saved with BLEU's made-up validations; the kept steps and the bookkeeping."""
    store = ckpt.CheckpointStore(directory / ckpt.CHECKPOINT_DIR, keep=keep, keep_best=keep_best, async_save=False)
    choice = Choice(metric="bleu")
    for step in range(1, 9):
        choice.update(step, BLEU[step])
        save(store, step, choice)
    store.close()
    return store.steps, choice


def test_best_and_average_best_load_the_right_steps(tmp_path):
    kept, _ = validated_run(tmp_path, keep=2, keep_best=3)
    assert kept == [2, 4, 7, 8]  # last 2: 7, 8; best 3: 2 (9.0), 8 (8.5), 4 (8.0)
    assert ckpt.load_averaged(tmp_path, best=1)[1] == [2] and kernel(ckpt.load_averaged(tmp_path, best=1)) == 2.0
    assert kernel(ckpt.load_averaged(tmp_path, best=2)) == pytest.approx(5.0)  # steps 2 and 8
    assert ckpt.load_averaged(tmp_path, best=3)[1] == [2, 4, 8]
    with pytest.raises(ValueError, match=r"keeps 3 of the 4 best checkpoints by validation bleu asked for \(8 "
                                         r"validations\); lower --average-best or train with train.keep_best >= 4"):
        ckpt.load_averaged(tmp_path, best=4)
    with pytest.raises(ValueError, match="give best or from_best alone"):
        ckpt.load_averaged(tmp_path, best=2, average_last=3)


def test_average_from_best_loads_the_best_and_the_checkpoints_after_it(tmp_path, monkeypatch):
    kept, choice = validated_run(tmp_path, keep=5, keep_best=1)
    assert kept == [2, 4, 5, 6, 7, 8]  # last 5: 4-8; the best: 2 (9.0); 3 was rotated away
    assert ckpt.load_averaged(tmp_path, from_best=1)[1] == [2]
    params, steps = ckpt.load_averaged(tmp_path, from_best=3)
    assert steps == [2, 4, 5] and kernel((params, steps)) == pytest.approx(11.0 / 3)  # the kept ones after 2
    assert ckpt.load_averaged(tmp_path, from_best=6)[1] == [2, 4, 5, 6, 7, 8]
    restored, restore = [], ckpt.CheckpointStore.restore

    def counted(store, step, *args, **kwargs):  # step 8 reads as torn
        restored.append(step)
        if step == 8:
            raise ckpt.CheckpointError("step 8 is torn")
        return restore(store, step, *args, **kwargs)

    monkeypatch.setattr(ckpt.CheckpointStore, "restore", counted)
    with pytest.raises(ckpt.CheckpointError, match=r"keeps 6 checkpoint\(s\) from its best \(step 2\) "
                                                   r"on, fewer than the 7 asked for; lower --average-from-best"):
        ckpt.load_averaged(tmp_path, from_best=7)
    assert restored == []  # too few kept: it fails before restoring any (a sweep skips such a window at once)
    assert ckpt.load_averaged(tmp_path, from_best=2)[1] == [2, 4] and restored == [2, 4]
    with pytest.raises(ckpt.CheckpointError, match=r"keeps 5 readable checkpoint\(s\) from its best \(step 2\) "
                                                   r"on \(1 unreadable: \[8\]\), fewer than the 6 asked for"):
        ckpt.load_averaged(tmp_path, from_best=6)
    with pytest.raises(ValueError, match="give best or from_best alone"):
        ckpt.load_averaged(tmp_path, from_best=2, step=8)
    # A run whose best was rotated away says so, as --best does.
    plain = ckpt.CheckpointStore(tmp_path / "plain" / ckpt.CHECKPOINT_DIR, keep=2, async_save=False)
    for step in range(1, 5):
        save(plain, step, choice)
    plain.close()
    with pytest.raises(ValueError, match=r"recorded no best checkpoint \(its best, step 2, was not kept\)"):
        ckpt.load_averaged(tmp_path / "plain", from_best=2)


def test_a_run_that_kept_no_best_says_so(tmp_path):
    store = ckpt.CheckpointStore(tmp_path / ckpt.CHECKPOINT_DIR, keep=2, async_save=False)
    choice = Choice(metric="nll")
    for step, value in ((1, 2.0), (2, 3.0), (3, 4.0)):  # the best (step 1) is rotated away
        choice.update(step, value)
        save(store, step, choice)
    store.close()
    with pytest.raises(ValueError, match=r"recorded no best checkpoint \(its best, step 1, was not kept\): train "
                                         r"it with train.keep_best >= 1"):
        ckpt.load_averaged(tmp_path, best=1)
    with pytest.raises(ValueError, match="recorded no best checkpoint: "):
        best_first(None, [2, 3], 1, tmp_path)


def test_best_options_that_conflict_are_refused_in_one_line(tmp_path, capsys):
    (tmp_path / ckpt.CHECKPOINT_DIR).mkdir()
    for kwargs, message in (
            (dict(best=True, average_last=3), "--best chooses checkpoints by validation, --average-last / --step by "
                                              "recency: give one of them"),
            (dict(average_best=2, step=5), "--average-best chooses checkpoints by validation"),
            (dict(average_from_best=2, average_last=3), "--average-from-best chooses checkpoints by validation"),
            (dict(best=True, average_best=2), "--best and --average-best each choose the checkpoints by "
                                              "validation: give one of them"),
            (dict(average_best=2, average_from_best=2), "--average-best and --average-from-best each choose"),
            (dict(average_best=0), "--average-best must be >= 1"),
            (dict(average_from_best=0), "--average-from-best must be >= 1")):
        with pytest.raises(ValueError, match=message):
            runs.validation_choice(tmp_path, **kwargs)
    with pytest.raises(ValueError, match="is not a training workdir"):
        jaxformer.load(tmp_path / "nowhere", best=True)
    assert runs.validation_choice(tmp_path, best=True) == {"best": 1}
    assert runs.validation_choice(tmp_path, average_best=3) == {"best": 3}
    assert runs.validation_choice(tmp_path, average_from_best=4) == {"from_best": 4}
    assert runs.validation_choice(tmp_path, average_last=2) == {}
    assert cli_main(["export", "--model", str(tmp_path), "--best", "--average-last", "2", "--out",
                     str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --best chooses checkpoints by validation") and "\n" not in err


# ------------------------------------------------------------------------------------- one training run


def test_a_run_records_its_choice_keeps_the_best_and_resumes_with_it(tmp_path, synthetic_setup,
                                                                     monkeypatch):
    config = tiny_config(tmp_path, synthetic_setup, steps=6, eval_every=2, best_metric="nll", keep_best=2,
                         keep_checkpoints=1, checkpoint_every_steps=0)
    result = jaxformer.train.run(config)
    valid = records_of(tmp_path, "valid")
    assert [r["step"] for r in valid] == [2, 4, 6]
    replay = Choice(metric="nll")
    for r in valid:
        replay.update(r["step"], r["nll"])
        assert (r["best_step"], r["best_nll"]) == (replay.best_step, replay.best_value)
    [end] = records_of(tmp_path, "end")
    assert end["reason"] == "steps" and end["best_step"] == replay.best_step == result["best_step"]
    assert "stopped: step 6 of train.steps=6 reached; best step" in (tmp_path / "train.log").read_text()
    kept = ckpt.CheckpointStore(tmp_path / ckpt.CHECKPOINT_DIR, read_only=True).steps
    assert kept == sorted({6} | set(replay.ranked([2, 4, 6])[:2]))
    assert jaxformer.load(tmp_path, best=True).checkpoint_steps == [replay.best_step]
    assert jaxformer.load(tmp_path, average_best=2).checkpoint_steps == sorted(replay.ranked([2, 4, 6])[:2])
    window = [s for s in kept if s >= replay.best_step][:2]  # the best and the next kept step, if any
    if len(window) == 2:
        assert jaxformer.load(tmp_path, average_from_best=2).checkpoint_steps == window
    else:
        with pytest.raises(ckpt.CheckpointError, match="fewer than the 2 asked for; lower --average-from-best"):
            jaxformer.load(tmp_path, average_from_best=2)
    # Resumed with more steps and patience 2, validations that never improve: it stops at the second of them,
    # with the best from before the resume, and a rerun has nothing left to train.
    monkeypatch.setattr(jaxformer.train._Trainer, "evaluate", lambda self, params: {"loss": 9.0, "nll": 9.0})
    config.train.update(steps=14, early_stopping_patience=2)
    result = jaxformer.train.run(config)
    log = (tmp_path / "train.log").read_text()
    assert "resumed from checkpoint step 6" in log and result["step"] == 10
    assert ("stopped: early stopping at step 10: 2 validation(s) without improvement "
            f"(train.early_stopping_patience=2); best step {replay.best_step}") in log
    assert records_of(tmp_path, "end")[-1] == {**records_of(tmp_path, "end")[-1], "reason": "early_stopping",
                                              "best_step": replay.best_step, "validations_since_best": 2}
    with ckpt.CheckpointStore(tmp_path / ckpt.CHECKPOINT_DIR, read_only=True) as store:
        assert store.steps[-1] == 10 and sorted(store.choice().values) == [2, 4, 6, 8, 10]
    assert jaxformer.train.run(config)["step"] == 10
    assert "the run stopped early at step 10 (train.early_stopping_patience=2): nothing to train" in \
           (tmp_path / "train.log").read_text()
    assert max(r["step"] for r in records_of(tmp_path, "train")) == 10


def test_a_time_budget_stops_validates_saves_and_counts_over_resumes(tmp_path, synthetic_setup, monkeypatch):
    clock = {"now": 1000.0}  # a made-up wall clock: each update takes a minute
    monkeypatch.setattr(jaxformer.train, "_clock", lambda: clock["now"])
    train_step = jaxformer.train._Trainer.train_step

    def one_minute_step(self, loop, step):
        clock["now"] += 60.0
        train_step(self, loop, step)

    monkeypatch.setattr(jaxformer.train._Trainer, "train_step", one_minute_step)
    config = tiny_config(tmp_path, synthetic_setup, steps=20, stop_after_minutes=3.5, checkpoint_every_steps=2)
    assert jaxformer.train.run(config)["step"] == 4  # 4 minutes >= 3.5 after step 4
    assert [r["step"] for r in records_of(tmp_path, "valid")] == [4]  # the last step is validated
    [end] = records_of(tmp_path, "end")
    assert end["reason"] == "time" and end["train_minutes"] == 4.0
    assert "stopped: train.stop_after_minutes=3.5 spent at step 4 of 20" in (tmp_path / "train.log").read_text()
    store = ckpt.CheckpointStore(tmp_path / ckpt.CHECKPOINT_DIR, read_only=True)
    assert store.steps == [2, 4] and store.restore(4).train_seconds == 240.0
    store.close()
    # The budget is spent: a rerun has nothing to train; a larger budget goes on, counting the 4 minutes.
    assert jaxformer.train.run(config)["step"] == 4
    assert "the run spent its time budget at step 4 (4.0 of train.stop_after_minutes=3.5): nothing to train" in \
        (tmp_path / "train.log").read_text()
    assert records_of(tmp_path, "end")[-1]["reason"] == "time"
    config.train.stop_after_minutes = 6.0
    assert jaxformer.train.run(config)["step"] == 6  # 4 + 2 minutes
    assert records_of(tmp_path, "end")[-1] == {**records_of(tmp_path, "end")[-1], "reason": "time",
                                              "train_minutes": 6.0}
    config.train.stop_after_minutes = -1.0
    with pytest.raises(ValueError, match="train.stop_after_minutes"):
        jaxformer.train.run(config)
