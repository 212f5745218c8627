"""Checkpoints: orbax save/restore, atomic writes, fallback past damaged checkpoints, averaging, loading a run."""

from __future__ import annotations

import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxformer
from jaxformer import checkpoint as ckpt
from jaxformer.config import default_config
from jaxformer.run_config import load_run_config, save_run_config


def tree(value: float, rows: int = 3):
    return {"params": {"dense": {"kernel": jnp.full((rows, 2), value, jnp.float32),
                                 "bias": jnp.arange(2, dtype=jnp.float32) + value}}}


def save_steps(directory, steps, *, keep=10, values=None):
    """Checkpoints at `steps` whose parameters are filled with the step number (or `values[i]`)."""
    store = ckpt.CheckpointStore(directory, keep=keep, async_save=True)
    tx = optax.adam(1e-3)
    for i, step in enumerate(steps):
        params = tree(float(step if values is None else values[i]))
        store.save(step, params=params, opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(step)),
                   data_state={"batches": step, "epoch": 0})
    store.wait()
    return store


def like():
    params = tree(0.0)
    return params, optax.adam(1e-3).init(params)


def damage_params(directory, step):
    """Overwrite every array data file of one checkpoint's parameters with garbage (a torn copy)."""
    files = [p for p in (directory / str(step) / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, "expected orbax array data files"
    for p in files:
        p.write_bytes(b"garbage")


def test_save_restore_roundtrip_keeps_last_k(tmp_path):
    store = save_steps(tmp_path / "ck", [1, 2, 3, 4], keep=3)
    assert store.steps == [2, 3, 4]  # max_to_keep
    params_like, opt_like = like()
    restored = store.restore(4, params_like=params_like, opt_state_like=opt_like)
    assert restored.step == 4
    np.testing.assert_array_equal(restored.params["params"]["dense"]["kernel"], np.full((3, 2), 4.0))
    np.testing.assert_array_equal(restored.rng, np.asarray(jax.random.key_data(jax.random.key(4))))
    assert restored.data_state == {"batches": 4, "epoch": 0}
    assert int(restored.opt_state[0].count) == 0
    store.close()


def test_orbax_writes_to_tmp_then_renames_and_partial_saves_are_ignored(tmp_path, caplog):
    directory = tmp_path / "ck"
    store = save_steps(directory, [2, 4])
    store.close()
    # Every finished checkpoint carries no trace of the temporary name it was written under.
    assert sorted(p.name for p in directory.iterdir()) == ["2", "4"]
    # A save killed before the rename leaves `<step>.orbax-checkpoint-tmp`: never listed as a step...
    shutil.copytree(directory / "4", directory / "6.orbax-checkpoint-tmp")
    reader = ckpt.CheckpointStore(directory, read_only=True)
    assert reader.steps == [2, 4]
    reader.close()
    # ... and a resuming (writing) store reports and removes it.
    with caplog.at_level(logging.WARNING, logger="jaxformer"):
        store = ckpt.CheckpointStore(directory, keep=5)
    assert "partial checkpoint" in caplog.text and "6.orbax-checkpoint-tmp" in caplog.text
    assert store.steps == [2, 4]
    assert not (directory / "6.orbax-checkpoint-tmp").exists()
    store.close()


@pytest.mark.parametrize("damage", ["array_files", "missing_metadata", "missing_item", "bad_json"])
def test_damaged_latest_checkpoint_falls_back_to_previous(tmp_path, caplog, damage):
    directory = tmp_path / "ck"
    store = save_steps(directory, [2, 4, 6])
    store.close()
    if damage == "array_files":
        damage_params(directory, 6)
    elif damage == "missing_metadata":
        (directory / "6" / "params" / "_METADATA").unlink()
    elif damage == "missing_item":
        shutil.rmtree(directory / "6" / "opt_state")
    else:
        (directory / "6" / "data" / "metadata").write_text("{not json")
    store = ckpt.CheckpointStore(directory, keep=5)
    params_like, opt_like = like()
    with caplog.at_level(logging.WARNING, logger="jaxformer"):
        restored = store.restore_latest(params_like=params_like, opt_state_like=opt_like)
    assert restored.step == 4
    np.testing.assert_array_equal(restored.params["params"]["dense"]["kernel"], np.full((3, 2), 4.0))
    assert "6 does not restore" in caplog.text and "fell back to checkpoint step 4" in caplog.text
    # The bad one is moved aside, not deleted, and the run can write step 6 again.
    assert (tmp_path / ckpt.CORRUPT_DIR / "6").is_dir()
    assert store.steps == [2, 4]
    store.save(6, params=tree(60.0), opt_state=opt_like, rng=np.zeros(2, np.uint32), data_state={})
    store.wait()
    assert store.steps == [2, 4, 6]
    store.close()


def test_no_readable_checkpoint_is_a_clear_error(tmp_path):
    directory = tmp_path / "ck"
    save_steps(directory, [1]).close()
    damage_params(directory, 1)
    store = ckpt.CheckpointStore(directory, keep=5)
    params_like, opt_like = like()
    with pytest.raises(ckpt.CheckpointError, match="none of the checkpoints"):
        store.restore_latest(params_like=params_like, opt_state_like=opt_like)
    store.close()
    empty = ckpt.CheckpointStore(tmp_path / "empty", keep=5)
    assert empty.restore_latest(params_like=params_like, opt_state_like=opt_like) is None
    empty.close()


def test_checkpoint_of_another_model_is_reported_and_left_in_place(tmp_path):
    directory = tmp_path / "ck"
    save_steps(directory, [3]).close()
    store = ckpt.CheckpointStore(directory, keep=5)
    bigger = tree(0.0, rows=5)
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"different model.*saved \(3, 2\), config \(5, 2\)"):
        store.restore_latest(params_like=bigger, opt_state_like=optax.adam(1e-3).init(bigger))
    assert store.steps == [3] and not (tmp_path / ckpt.CORRUPT_DIR).exists()
    store.close()


def test_average_checkpoints_is_the_elementwise_mean():
    averaged = average = ckpt.average_checkpoints([tree(1.0), tree(2.0), tree(6.0)])
    np.testing.assert_allclose(averaged["params"]["dense"]["kernel"], np.full((3, 2), 3.0))
    np.testing.assert_allclose(average["params"]["dense"]["bias"], np.array([3.0, 4.0]))
    assert averaged["params"]["dense"]["kernel"].dtype == np.float32
    with pytest.raises(ValueError, match="different models"):
        ckpt.average_checkpoints([tree(1.0), tree(1.0, rows=4) | {"extra": jnp.zeros(1)}])


def test_load_averaged_averages_the_last_k(tmp_path, caplog):
    directory = tmp_path / ckpt.CHECKPOINT_DIR
    save_steps(directory, [10, 20, 30, 40], values=[1.0, 2.0, 4.0, 9.0]).close()
    kernel = lambda p: np.asarray(p[0]["params"]["dense"]["kernel"])[0, 0]  # noqa: E731  (params, steps)
    assert kernel(ckpt.load_averaged(tmp_path)) == 9.0
    assert kernel(ckpt.load_averaged(tmp_path, step=20)) == 2.0
    assert kernel(ckpt.load_averaged(tmp_path, average_last=2)) == pytest.approx(6.5)
    assert kernel(ckpt.load_averaged(tmp_path, average_last=3, step=30)) == pytest.approx(7 / 3)
    with pytest.raises(ckpt.CheckpointError, match="4 readable checkpoint.*fewer than the 5 asked for"):
        ckpt.load_averaged(tmp_path, average_last=5)
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint for step 25"):
        ckpt.load_averaged(tmp_path, step=25)
    # A damaged checkpoint is skipped (and said so); the average uses the next older ones.
    damage_params(directory, 40)
    with caplog.at_level(logging.WARNING, logger="jaxformer"):
        assert kernel(ckpt.load_averaged(tmp_path, average_last=2)) == pytest.approx(3.0)
    assert "skipped unreadable [40]" in caplog.text
    assert (directory / "40").is_dir()  # a reader never moves anything


def test_load_averaged_without_checkpoints_says_so(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no checkpoints"):
        ckpt.load_averaged(tmp_path)


def test_average_writes_into_a_new_or_empty_folder_only(tmp_path, capsys):
    """The output-folder rule of every export (jaxformer.staging), said before the averaging starts."""
    import orbax.checkpoint as ocp

    save_steps(tmp_path / ckpt.CHECKPOINT_DIR, [10, 20]).close()

    def average(out):
        return ckpt.main(["average", "--workdir", str(tmp_path), "--last", "2", "--out", str(out)])

    occupied, a_file, empty = tmp_path / "occupied", tmp_path / "a_file", tmp_path / "empty"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    a_file.write_text("mine")
    empty.mkdir()
    assert average(occupied) == 1 and "exists and is not empty" in capsys.readouterr().err
    assert average(a_file) == 1 and "exists and is not a directory" in capsys.readouterr().err
    assert [p.name for p in occupied.iterdir()] == ["notes.txt"] and a_file.read_text() == "mine"
    assert average(empty) == 0
    written = ocp.StandardCheckpointer().restore(empty)
    np.testing.assert_allclose(written["params"]["dense"]["kernel"], np.full((3, 2), 15.0))


def test_run_config_roundtrip_and_errors(tmp_path):
    config = default_config()
    config.model.d_model = 64
    config.model.d_k = 16
    config.data.bucket_lengths = (8, 16)
    save_run_config(config, tmp_path)
    loaded = load_run_config(tmp_path)
    assert loaded.model.d_model == 64 and loaded.model.d_k == 16 and loaded.model.d_v is None
    assert loaded.data.bucket_lengths == (8, 16)
    assert loaded.to_dict() == config.to_dict()
    # A run saved by a version with a key this one lacks still loads; one lacking a key gets its default.
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["train"]["from_the_future"] = 1
    del saved["train"]["plot"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = load_run_config(tmp_path)
    assert loaded.train.from_the_future == 1 and loaded.train.plot is True
    with pytest.raises(ckpt.CheckpointError, match="not a jaxformer run directory"):
        load_run_config(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text('{"model": {"d_model": "wide"}}')
    with pytest.raises(ckpt.CheckpointError, match="model.d_model"):
        load_run_config(tmp_path)


def test_load_model_and_average_cli(tmp_path, multi30k_tokenizer, capsys):
    """A run directory made of its parts: config, vocabulary, checkpoints -> a working model."""
    from jaxformer.model import Transformer, TransformerConfig

    config = default_config()
    config.model.update(d_model=32, d_ff=64, num_heads=2, num_encoder_layers=1, num_decoder_layers=1)
    save_run_config(config, tmp_path)
    shutil.copy(multi30k_tokenizer.path, tmp_path / ckpt.VOCAB_FILE)
    model_cfg = TransformerConfig.from_dict(config.model.to_dict(), vocab_size=multi30k_tokenizer.vocab_size)
    store = ckpt.CheckpointStore(tmp_path / ckpt.CHECKPOINT_DIR, keep=5)
    tx = optax.adam(1e-3)
    all_params = []
    for step in (1, 2):
        params = Transformer(model_cfg).init(jax.random.key(step), jnp.ones((1, 4), jnp.int32),
                                             jnp.ones((1, 4), jnp.int32))
        all_params.append(params)
        store.save(step, params=params, opt_state=tx.init(params), rng=np.zeros(2, np.uint32), data_state={})
    store.close()

    model, params, tokenizer = jaxformer.load(tmp_path, average_last=2)
    assert model.config == model_cfg and tokenizer.vocab_size == multi30k_tokenizer.vocab_size
    expected = ckpt.average_checkpoints(all_params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), params, expected)
    src = jnp.asarray([tokenizer.encode(["A dog runs."])[0] + [3]])
    logits = model.apply(params, src, jnp.asarray([[2, 5, 6]]))
    assert logits.shape == (1, 3, tokenizer.vocab_size) and bool(jnp.all(jnp.isfinite(logits)))

    out = tmp_path / "averaged"
    assert ckpt.main(["average", "--workdir", str(tmp_path), "--last", "2", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    import orbax.checkpoint as ocp

    written = ocp.StandardCheckpointer().restore(out)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), written, expected)
    assert ckpt.main(["average", "--workdir", str(tmp_path), "--last", "3", "--out", str(tmp_path / "x")]) == 1
    assert "fewer than the 3 asked for" in capsys.readouterr().err
    os.remove(tmp_path / ckpt.VOCAB_FILE)
    with pytest.raises(ckpt.CheckpointError, match="vocab.model not found"):
        jaxformer.load(tmp_path)


def test_a_run_saved_before_attention_bias_existed_loads_with_biases(tmp_path, multi30k_tokenizer):
    """Runs and exports written before model.attention_bias had biases on the attention projections and no
    key for them: they load (and export, and resume) as attention_bias=True."""
    from jaxformer.io import native
    from jaxformer.model import TransformerConfig, init_params

    config = default_config()
    config.model.update(d_model=32, d_ff=64, num_heads=2, num_encoder_layers=1, num_decoder_layers=1)
    saved = json.loads(config.to_json_best_effort())
    del saved["model"]["attention_bias"]
    (tmp_path / ckpt.CONFIG_FILE).write_text(json.dumps(saved))
    shutil.copy(multi30k_tokenizer.path, tmp_path / ckpt.VOCAB_FILE)
    old = TransformerConfig.from_dict({**saved["model"], "attention_bias": True},
                                      vocab_size=multi30k_tokenizer.vocab_size)
    params = init_params(old, jax.random.key(0))
    with ckpt.CheckpointStore(tmp_path / ckpt.CHECKPOINT_DIR, async_save=False) as store:
        store.save(1, params=params, opt_state=optax.adam(1e-3).init(params), rng=np.zeros(2, np.uint32),
                   data_state={})
    translator = jaxformer.load(tmp_path)
    assert translator.model.config.attention_bias is True
    assert "bias" in translator.params["params"]["encoder_0"]["self_attention"]["query"]
    exported = native.write(translator, tmp_path / "export")
    meta = json.loads((exported / "config.json").read_text())
    del meta["model"]["attention_bias"]  # an export written before the option
    (exported / "config.json").write_text(json.dumps(meta))
    assert jaxformer.load(exported).model.config.attention_bias is True
