"""Fine-tuning (`train.init_from`): an imported Marian model trains on parallel files, keeps its vocabulary and
architecture, and the run directory then loads, translates and resumes like any other."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from jaxformer.config import load_recipe  # noqa: E402
from jaxformer.io.marian_import import import_marian  # noqa: E402
from jaxformer.train import run  # noqa: E402
import jaxformer  # noqa: E402
from helpers import build_marian_dir, records_of, short_pairs  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def imported(multi30k_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    hf_dir = build_marian_dir(root / "hf", multi30k_dir, "swish")
    data = root / "data"
    data.mkdir()
    for split, start, n in (("train", 0, 300), ("val", 0, 24)):
        sources, targets = short_pairs(multi30k_dir, split, n, start)
        (data / f"{split}.en").write_text("\n".join(sources) + "\n", encoding="utf-8")
        (data / f"{split}.de").write_text("\n".join(targets) + "\n", encoding="utf-8")
    return import_marian(hf_dir, root / "model"), data


def finetune_config(init_from, data: pathlib.Path, workdir: pathlib.Path, **train):
    """configs/finetune.py, shrunk to seconds: 20 steps of ~512 slots on 300 pairs."""
    c = load_recipe(REPO / "configs" / "finetune.py")
    c.train.update(init_from=str(init_from), workdir=str(workdir), steps=20, warmup_steps=5, lr_scale=0.5,
                   log_every=1, eval_every=0, eval_bleu_sentences=4, checkpoint_every_steps=10, keep_checkpoints=2,
                   progress_bar=False, plot=False, cpu_data_parallel=False)
    c.train.update(train)
    c.data.update(train_files=str(data / "train"), valid_files=str(data / "val"), test_files=str(data / "val"),
                  tokens_per_batch=512, bucket_lengths=(64,), max_len=64, prefetch=0)
    return c


def test_finetuning_an_imported_model_lowers_its_loss_and_keeps_its_vocabulary(imported, tmp_path):
    model_dir, data = imported
    workdir = tmp_path / "run"
    result = run(finetune_config(model_dir, data, workdir))
    losses = [r["loss"] for r in records_of(workdir, "train")]
    assert len(losses) == 20
    first, last = np.mean(losses[:4]), np.mean(losses[-4:])
    print(f"fine-tuning 20 steps: train loss {first:.3f} (steps 1-4) -> {last:.3f} (steps 17-20)")
    assert last < first - 0.1
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["model"]["activation"] == "swish" and saved["model"]["sinusoid_layout"] == "halves"
    assert (workdir / "marian_vocab" / "vocab.json").is_file()
    translator = jaxformer.load(workdir)  # the run loads with its Marian vocabulary and architecture
    assert translator.tokenizer.kind == "marian" and translator.model.config.logits_bias
    assert isinstance(translator("A man rides a horse.", beam_size=1), str)
    assert "valid_bleu" in result
    again = run(finetune_config(model_dir, data, workdir, steps=22))  # resumes from step 20, not from init_from
    assert again["step"] == 22


@pytest.mark.parametrize("key, value, message", [
    ("model.d_model", 64, "model.d_model=64 contradicts train.init_from"),
    ("model.activation", "gelu", "model.activation='gelu' contradicts train.init_from"),
    ("data.vocab_model", "some.model", "data.vocab_model=some.model contradicts train.init_from"),
])
def test_a_config_that_contradicts_the_model_is_refused_by_key(imported, tmp_path, key, value, message):
    model_dir, data = imported
    config = finetune_config(model_dir, data, tmp_path / "run")
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=message):
        run(config)


def test_init_from_must_be_an_export(imported, tmp_path):
    _, data = imported
    with pytest.raises(ValueError, match="train.init_from=.* no such directory"):
        run(finetune_config(tmp_path / "missing", data, tmp_path / "run"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is not a jaxformer export directory"):
        run(finetune_config(tmp_path / "empty", data, tmp_path / "run"))
