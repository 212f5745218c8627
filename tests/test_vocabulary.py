"""The shared sentencepiece vocabulary (jaxformer.data.vocabulary): special ids, training, reloading, the sample."""

from __future__ import annotations

import numpy as np
import pytest

from jaxformer.data import BOS_ID, EOS_ID, PAD_ID, UNK_ID, DataError, Tokenizer, get_tokenizer
from helpers import data_config as config, write_pair

pytestmark = pytest.mark.usefixtures("token_cache_dir")  # conftest's: one token cache folder for the data tests


def test_tokenizer_special_ids_encode_decode_and_reload(multi30k_tokenizer, tmp_path):
    tok = multi30k_tokenizer
    assert tok.vocab_size == 1000
    assert [tok.id_to_piece(i) for i in (PAD_ID, UNK_ID, BOS_ID, EOS_ID)] == ["<pad>", "<unk>", "<s>", "</s>"]
    ids = tok.encode(["Ein Mann fährt Fahrrad.", "A dog runs."])
    assert all(ids) and not {BOS_ID, EOS_ID, PAD_ID} & set(ids[0] + ids[1])
    assert tok.decode(ids) == ["Ein Mann fährt Fahrrad.", "A dog runs."]
    # decode stops at EOS and ignores BOS / PAD, for lists and numpy rows alike
    row = np.array([BOS_ID] + ids[0] + [EOS_ID] + ids[1] + [PAD_ID] * 3)
    assert tok.decode([row, [PAD_ID] + ids[1]]) == ["Ein Mann fährt Fahrrad.", "A dog runs."]
    assert tok.encode(["中"])[0][-1] == UNK_ID  # not in the vocabulary's alphabet
    again = Tokenizer.load(tok.path)
    assert again.serialized == tok.serialized and again.encode(["A dog."]) == tok.encode(["A dog."])
    with pytest.raises(DataError, match="missing sentencepiece model .*nope.model"):
        Tokenizer.load(str(tmp_path / "nope.model"))


def test_get_tokenizer_trains_saves_and_reloads_on_resume(tmp_path):
    prefix = write_pair(tmp_path, [f"the number {i} is here" for i in range(300)],
                        [f"die Zahl {i} ist hier" for i in range(300)])
    cfg = config(train_files=prefix, vocab_size=200, vocab_sample_size=100)
    workdir = tmp_path / "run"
    tok = get_tokenizer(cfg, str(workdir))
    saved = (workdir / "vocab.model").read_bytes()
    assert tok.serialized == saved and tok.vocab_size <= 200
    cfg.data.vocab_size = 150  # a resumed run keeps its vocabulary whatever the config now says
    assert get_tokenizer(cfg, str(workdir)).serialized == saved
    # an explicit model is used and copied beside a fresh run
    cfg.data.vocab_model = str(workdir / "vocab.model")
    assert get_tokenizer(cfg, str(tmp_path / "run2")).serialized == saved
    assert (tmp_path / "run2" / "vocab.model").read_bytes() == saved


def test_vocabulary_sample_is_spread_over_the_whole_corpus(tmp_path):
    from jaxformer.data import sample_sentences

    prefix = write_pair(tmp_path, [f"first {i}" for i in range(500)] + [f"second {i}" for i in range(500)],
                        [f"erste {i}" for i in range(500)] + [f"zweite {i}" for i in range(500)])
    sample = sample_sentences(config(train_files=prefix).data, 200)
    assert len(sample) == 200 and len(set(sample)) == 200
    late = sum(s.startswith(("second", "zweite")) for s in sample)
    assert 60 <= late <= 140  # about half from the second half, not the first 200 sentences
