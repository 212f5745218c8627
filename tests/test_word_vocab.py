"""The word-level vocabulary of parsing: whole words and tree symbols, one id each, with the grammar's kinds."""

from __future__ import annotations

import pytest

from jaxformer import grammar
from jaxformer.config import default_config
from jaxformer.data import BOS_ID, EOS_ID, PAD_ID, UNK_ID, DataError, WordVocab, get_tokenizer, load_vocabulary
from jaxformer.data.vocabulary import run_vocabulary, vocabulary_filename

PAIRS = [("The cat sat .", "(S (NP DT NN ) (VP VBD ) . )"),
         ("The dog sat .", "(S (NP DT NN ) (VP VBD ) . )"),
         ("Cats purr", "(S (NP NNS ) (VP VBP ) )")]


def test_words_and_symbols_are_whole_and_rare_words_are_unk(tmp_path):
    vocab = WordVocab.build(PAIRS, min_count=2, path=str(tmp_path / "v.json"))
    assert [vocab.id_to_piece(i) for i in (PAD_ID, UNK_ID, BOS_ID, EOS_ID)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert {vocab.id_to_piece(i) for i in vocab.targets} == {"(S", "(NP", "(VP", "DT", "NN", "NNS", "VBD", "VBP",
                                                             ".", ")"}
    # "The", "sat" seen twice are kept; "cat", "dog", "Cats", "purr" once: UNK. "." is a symbol: one id for both.
    ids = vocab.encode(["The cat sat ."])[0]
    assert ids[1] == UNK_ID and UNK_ID not in (ids[0], ids[2], ids[3])
    assert ids[3] == vocab.piece_to_id(".")
    target = vocab.encode_target([PAIRS[0][1]])[0]
    assert len(target) == len(PAIRS[0][1].split()) and UNK_ID not in target
    assert vocab.decode([target + [EOS_ID, 7]]) == [PAIRS[0][1]]
    again = load_vocabulary(str(tmp_path / "v.json"))
    assert again.kind == "words" and again.serialized == vocab.serialized and again.vocab_size == vocab.vocab_size
    assert vocabulary_filename("words") == "vocab.words.json"


def test_grammar_kinds_come_from_the_target_symbols():
    vocab = WordVocab.build(PAIRS)
    kinds = vocab.grammar_kinds()
    assert kinds.shape == (vocab.vocab_size,)
    kind_of = {p: int(kinds[vocab.piece_to_id(p)]) for p in ("(S", "(NP", ")", "DT", ".", "The", "</s>", "<pad>")}
    assert kind_of == {"(S": grammar.OPEN, "(NP": grammar.OPEN, ")": grammar.CLOSE, "DT": grammar.TAG,
                       ".": grammar.TAG, "The": grammar.OTHER, "</s>": grammar.END, "<pad>": grammar.OTHER}


def test_bad_vocabularies_say_what_is_wrong(tmp_path):
    with pytest.raises(DataError, match="no training pairs"):
        WordVocab.build([])
    with pytest.raises(DataError, match="no target symbols"):
        WordVocab(["<pad>", "<unk>", "<s>", "</s>", "a"], []).grammar_kinds()
    (tmp_path / "x.json").write_text('{"kind": "marian"}')
    with pytest.raises(DataError, match="not a word vocabulary"):
        load_vocabulary(str(tmp_path / "x.json"))


def test_a_run_builds_its_word_vocabulary_from_the_training_pairs(tmp_path):
    for side, texts in (("words", [s for s, _ in PAIRS]), ("tree", [t for _, t in PAIRS])):
        (tmp_path / f"train.{side}").write_text("\n".join(texts) + "\n")
    config = default_config()
    config.data.update(source="files", train_files=str(tmp_path / "train"), src_lang="words", tgt_lang="tree",
                       vocab_kind="words", min_count=2)
    vocab = get_tokenizer(config, str(tmp_path / "run"))
    assert vocab.kind == "words" and (tmp_path / "run" / "vocab.words.json").is_file()
    assert vocab.encode(["cat"]) == [[UNK_ID]] and vocab.encode(["The"]) != [[UNK_ID]]
    assert run_vocabulary(str(tmp_path / "run")).serialized == vocab.serialized
