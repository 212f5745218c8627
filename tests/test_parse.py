"""Parsing (§6.3): treebank data into training, a tiny parser trained, its trees parsed with the grammar mask."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from jaxformer.config import default_config
from jaxformer.data import DataError, get_tokenizer, make_batches, read_pairs
from jaxformer.data.sources import ensure_treebank
from jaxformer.data.treebank import delinearize, linearize, read_trees

PTB_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ptb_sample"
FILES = {"train": (1, 2, 3, 4), "valid": (140,), "test": (160,)}  # a handful of the sample's files per split


@pytest.fixture(scope="module")
def small_treebank(tmp_path_factory) -> Path:
    """A few of the sample's files, keeping their numbers, so the sample's split ranges apply."""
    if not (PTB_SAMPLE / "wsj_0001.mrg").exists():
        pytest.fail(f"the Penn Treebank sample is not at {PTB_SAMPLE}; the tests expect ../shared beside the checkout")
    directory = tmp_path_factory.mktemp("treebank")
    for numbers in FILES.values():
        for n in numbers:
            shutil.copy(PTB_SAMPLE / f"wsj_{n:04d}.mrg", directory)
    return directory


def treebank_config(treebank_dir, work: Path, **data):
    c = default_config()
    c.data.update(source="treebank", treebank_dir=str(treebank_dir), treebank_data_dir=str(work / "tb"),
                  src_lang="en", tgt_lang="tree", vocab_kind="words", min_count=1, cache_dir=str(work / "cache"))
    c.data.update(data)
    return c


def test_the_treebank_source_gives_words_and_symbols_per_split(small_treebank, tmp_path):
    config = treebank_config(small_treebank, tmp_path)
    for split, numbers in FILES.items():
        trees = read_trees([small_treebank / f"wsj_{n:04d}.mrg" for n in numbers])
        expected = [(" ".join(w), " ".join(s)) for w, s in map(linearize, trees)]
        assert read_pairs(config.data, split) == expected
    folder = ensure_treebank(config.data)
    assert ensure_treebank(config.data) == folder  # written once; an edited treebank is linearized anew
    os.utime(small_treebank / "wsj_0160.mrg", ns=(1, 1))
    assert ensure_treebank(config.data) != folder


def test_sentences_over_max_len_are_counted_skips(small_treebank, tmp_path):
    config = treebank_config(small_treebank, tmp_path, max_len=40, bucket_lengths=(40,), tokens_per_batch=400)
    vocab = get_tokenizer(config, str(tmp_path / "run"))
    targets = [len(t.split()) + 1 for _, t in read_pairs(config.data, "train")]
    batches = make_batches(config, vocab, "train", repeat=False, shuffle=False)
    list(batches)
    assert batches.stats["too_long"] == sum(n > 40 for n in targets) > 0
    assert batches.cache.stats["read"] == len(targets)


def test_treebank_config_errors_name_the_key(small_treebank, tmp_path):
    with pytest.raises(DataError, match="data.treebank_dir is empty"):
        ensure_treebank(treebank_config("", tmp_path).data)
    with pytest.raises(DataError, match="data.treebank_splits='ptb'"):
        ensure_treebank(treebank_config(small_treebank, tmp_path, treebank_splits="ptb").data)
    with pytest.raises(DataError, match="no wsj_NNNN.mrg file numbered 0200-2199"):
        ensure_treebank(treebank_config(small_treebank, tmp_path, treebank_splits="wsj").data)


def test_gold_target_ids_score_100_through_the_parsers_scoring_path(small_treebank, tmp_path, monkeypatch):
    """An oracle parser: the search (`translate._search`, the one piece replaced) answers each sentence with its
    gold tree's target ids as training encodes them; everything after it (search_ids' output handling, ids to
    symbols, delinearize, parseval) is what training validation, `jaxformer evaluate` and `jaxformer parse`
    run, and must give F1, tagging accuracy and exact match 100 with nothing ill-formed."""
    import collections
    import types

    import jax.numpy as jnp
    from nltk.tree import Tree

    from jaxformer import grammar, translate
    from jaxformer.data import EOS_ID, PAD_ID, UNK_ID
    from jaxformer.evaluate import evaluate_parser
    from jaxformer.parseval import score_trees
    from jaxformer.parsing import validation_scores
    from jaxformer.translate import Translator

    config = treebank_config(small_treebank, tmp_path, min_count=2)  # the recipe's: rare source words are UNK
    vocab = get_tokenizer(config, str(tmp_path / "run"))
    pairs = read_pairs(config.data, "valid")
    direct = read_trees([small_treebank / "wsj_0140.mrg"])  # the .mrg trees, not the linearized references
    sources, targets = vocab.encode([s for s, _ in pairs]), vocab.encode_target([t for _, t in pairs])
    assert UNK_ID in {i for s in sources for i in s} and UNK_ID not in {i for t in targets for i in t}
    assert all(i in set(vocab.targets) for t in targets for i in t)

    # Each gold sequence is one the grammar mask lets every search make.
    kinds = vocab.grammar_kinds()
    for s, t in zip(sources, targets):
        state = grammar.initial_state(np.array([len(s)]))
        for token in t + [EOS_ID]:
            assert bool(grammar.allowed(state, kinds)[0, token]), vocab.id_to_piece(token)
            state = grammar.advance(state, jnp.array([token]), kinds)

    answers: dict = {}

    def oracle(decode_lib, model, params, src, *args, **kwargs):
        rows = []
        for row in np.asarray(src).tolist():
            ids = row[:row.index(EOS_ID)] if EOS_ID in row else []
            rows.append(answers[tuple(ids)].popleft() if ids else [])
        tokens = np.full((len(rows), 1, max(map(len, rows)) + 3), PAD_ID, np.int32)  # hypothesis, EOS, then PAD
        for i, ids in enumerate(rows):
            tokens[i, 0, :len(ids) + 1] = ids + [EOS_ID]
        return {"tokens": tokens}

    def expect_gold():
        answers.clear()
        for s, t in zip(sources, targets):
            answers.setdefault(tuple(s), collections.deque()).append(t)

    monkeypatch.setattr(translate, "_search", oracle)
    model = types.SimpleNamespace(config=types.SimpleNamespace(max_len=config.model.max_len))
    expect_gold()
    scores, brackets = validation_scores(model, {}, vocab, pairs, config.decode)  # training's validation
    assert scores == {"f1": 100.0, "f1_40": 100.0, "tagging_accuracy": 100.0, "exact_match": 1.0, "ill_formed": 0}
    assert [Tree.fromstring(b)[0] for b in brackets] == direct
    against_mrg = score_trees(direct, [Tree.fromstring(b) for b in brackets]).all
    assert (against_mrg.scored, against_mrg.f1, against_mrg.tagging_accuracy) == (len(direct), 100.0, 100.0)
    expect_gold()
    translator = Translator(model, {}, vocab, decode={**config.decode.to_dict(), "beam_size": 4})
    result = evaluate_parser(translator, [s for s, _ in pairs], [t for _, t in pairs], "valid", "valid",
                             tmp_path / "eval")  # `jaxformer evaluate`, which `jaxformer parse` shares parse_words with
    assert (result.score.all.f1, result.score.all.tagging_accuracy, result.score.all.complete_match,
            result.ill_formed) == (100.0, 100.0, 100.0, 0)


def load_recipe(name: str):
    import importlib.util

    from jaxformer.config import check_lengths, check_train_config
    from jaxformer.model import TransformerConfig

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    check_train_config(config.train)
    check_lengths(config)
    TransformerConfig.from_dict(config.model.to_dict(), vocab_size=100)
    return config


def test_parse_recipes_hold_the_papers_search_and_layers():
    sample, wsj = load_recipe("ptb_parse"), load_recipe("wsj_parse")
    for c in (sample, wsj):
        assert (c.model.num_encoder_layers, c.model.num_decoder_layers) == (4, 4)
        assert (c.decode.beam_size, c.decode.length_penalty, c.decode.max_extra_len) == (21, 0.3, 300)
        assert (c.data.source, c.data.vocab_kind) == ("treebank", "words")
        assert c.model.max_len >= c.data.max_len + c.decode.max_extra_len  # room for input + 300
    assert wsj.model.d_model == 1024 and wsj.data.treebank_splits == "wsj" and wsj.data.tokens_per_batch >= 25_000
    assert sample.data.treebank_splits == "sample"
    repo = Path(__file__).resolve().parents[1]
    assert (repo / sample.data.treebank_dir / "wsj_0001.mrg").is_file()  # from the checkout, as train.py runs


# ------------------------------------------------------------------------------- a tiny parser, trained


@pytest.fixture(scope="module")
def tiny_parser(small_treebank, tmp_path_factory):
    """A 1+1-layer, d_model 32 parser trained for a few steps on the small treebank, loaded."""
    import jaxformer
    from jaxformer.train import run

    work = tmp_path_factory.mktemp("parser")
    config = treebank_config(small_treebank, work, max_len=128, bucket_lengths=(128,), tokens_per_batch=1024)
    config.model.update(d_model=32, d_ff=64, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, max_len=192)
    config.train.update(workdir=str(work / "run"), steps=8, warmup_steps=4, lr_scale=2.0, log_every=4,
                        eval_every=0, eval_bleu_sentences=4, best_metric="f1", keep_best=1,
                        checkpoint_every_steps=8, keep_checkpoints=1, average_last=1, progress_bar=False, plot=False)
    config.decode.update(beam_size=1, max_extra_len=60, batch_size=8)
    result = run(config)
    return jaxformer.load(work / "run"), read_pairs(config.data, "valid", limit=6), result


def test_training_validates_a_parser_by_dev_f1(tiny_parser):
    result = tiny_parser[2]
    assert result["valid_ill_formed"] == 0 and 0 <= result["valid_f1"] <= 100 and "valid_bleu" not in result
    assert result["valid_best_step"] == 8 and result["valid_best_f1"] == result["valid_f1"]


def test_every_masked_parse_of_the_dev_sentences_is_a_tree_with_a_tag_per_word(tiny_parser):
    from jaxformer.parsing import parse_words

    translator, pairs, _ = tiny_parser
    sentences = [source.split() for source, _ in pairs]
    for beam in (1, 3):
        parses = parse_words(translator, sentences, beam_size=beam)
        for words, parse in zip(sentences, parses):
            assert not parse.repaired
            assert parse.tree.leaves() == words and len(parse.tree.pos()) == len(words)
            assert delinearize(parse.symbols, words) == parse.tree  # well formed as searched


def run_cli(args, capsys):
    from jaxformer import cli

    rc = cli.main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def test_parse_command_writes_trees_jsonl_and_drawings(tiny_parser, tmp_path, capsys):
    from nltk.tree import Tree

    from jaxformer.parsing import tokenize

    translator, _, _ = tiny_parser
    raw = ["The cat (a tabby) didn't sit.", "", "Pierre Vinken will join the board."]
    (tmp_path / "in.txt").write_text("\n".join(raw) + "\n")
    model = ["--model", translator.source, "--input", str(tmp_path / "in.txt")]
    rc, out, err = run_cli(["parse", *model], capsys)
    assert rc == 0, err
    lines = out.splitlines()
    assert len(lines) == 3 and lines[1] == ""
    for text, line in ((raw[0], lines[0]), (raw[2], lines[2])):
        tree = Tree.fromstring(line)
        assert tree.label() == "TOP" and tree.leaves() == tokenize(text)
    assert tokenize(raw[0])[:6] == ["The", "cat", "-LRB-", "a", "tabby", "-RRB-"]
    rc, out, _ = run_cli(["parse", *model, "--format", "jsonl"], capsys)
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["tree"] for r in records] == lines and records[0]["words"] == tokenize(raw[0])
    rc, out, _ = run_cli(["parse", *model, "--draw"], capsys)
    drawn = out.splitlines()
    assert drawn[0] == lines[0] and "___" in out and lines[2] in drawn
    assert [w for w in drawn[-2].split() if w != "|"] == tokenize(raw[2])  # the drawing's last row: the words
    (tmp_path / "tok.txt").write_text("Do n't -LRB- stop -RRB- .\n")
    rc, out, _ = run_cli(["parse", "--model", translator.source, "--input", str(tmp_path / "tok.txt"),
                          "--pretokenized"], capsys)
    assert Tree.fromstring(out).leaves() == ["Do", "n't", "-LRB-", "stop", "-RRB-", "."]


def test_without_the_mask_ill_formed_outputs_are_repaired_and_counted(tiny_parser, tmp_path, capsys):
    from nltk.tree import Tree

    translator, pairs, _ = tiny_parser
    (tmp_path / "dev.txt").write_text("".join(source + "\n" for source, _ in pairs))
    rc, out, err = run_cli(["parse", "--model", translator.source, "--input", str(tmp_path / "dev.txt"),
                            "--pretokenized", "--no-grammar", "--format", "jsonl"], capsys)
    assert rc == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    repaired = sum(r["repaired"] for r in records)
    assert repaired > 0 and f"parse: {repaired} of {len(pairs)} outputs were not well-formed" in err
    for (source, _), record in zip(pairs, records):
        assert Tree.fromstring(record["tree"]).leaves() == source.split()


def test_a_sentence_over_the_limit_is_an_error_saying_the_limit(tiny_parser, tmp_path, capsys):
    translator, _, _ = tiny_parser
    (tmp_path / "long.txt").write_text("short one\n" + " ".join(["word"] * 200) + "\n")
    rc, out, err = run_cli(["parse", "--model", translator.source, "--input", str(tmp_path / "long.txt")], capsys)
    assert rc == 1 and out == ""
    assert err.strip() == (f"error: {tmp_path / 'long.txt'}:2: 200 words, more than this model's limit of 189 "
                           f"(model.max_len=192 - 3); split the sentence")


def test_a_translation_model_is_not_a_parser():
    from types import SimpleNamespace

    from jaxformer.parsing import ParseError, parse_words

    with pytest.raises(ParseError, match="x is not a parser: its vocabulary is 'sentencepiece'"):
        parse_words(SimpleNamespace(tokenizer=SimpleNamespace(kind="sentencepiece"), source="x"), [["a"]])


@pytest.mark.parametrize("symbols, words, expected", [
    ("(S (NP DT NN ) (VP VBD ) . )", 4, "(S (NP DT NN ) (VP VBD ) . )"),  # well formed: unchanged
    (") (S DT ) ) NN )", 2, "(S DT NN )"),          # a ')' closing nothing, one ending the root too soon
    ("(S (NP ) DT DT DT )", 2, "(S (NP DT DT ) )"),  # an empty constituent kept open; a tag with no word left
    ("(S (NP DT", 3, "(S (NP DT NN NN ) )"),        # missing tags, open brackets closed at the end
    ("DT NN", 2, "(S NN NN )"),                      # no bracket at all: tags outside dropped, rooted in (S
    ("(S DT ) (S NN )", 1, "(S DT )"),               # whatever follows the complete tree is dropped
    ("(S (NP DT ) (PP", 1, "(S (NP DT ) )"),         # constituents left empty at the end are removed
])
def test_repair_makes_one_tree_by_the_fixed_rule(symbols, words, expected):
    from jaxformer.parsing import repair

    fixed = repair(symbols.split(), words)
    assert " ".join(fixed) == expected
    delinearize(fixed, [f"w{i}" for i in range(words)])


def test_evaluate_scores_a_parser_by_parseval_and_writes_gold_and_parsed_trees(tiny_parser, small_treebank, tmp_path,
                                                                                 capsys):
    from nltk.tree import Tree

    from jaxformer.data.treebank import to_bracket
    from jaxformer.parseval import score_trees

    translator, _, _ = tiny_parser
    out = tmp_path / "eval"
    rc, stdout, err = run_cli(["evaluate", "--model", translator.source, "--split", "valid", "--limit", "5",
                               "--out", str(out)], capsys)
    assert rc == 0, err
    gold = read_trees([small_treebank / "wsj_0140.mrg"])[:5]
    assert (out / "valid.gold").read_text().splitlines() == [to_bracket(t) for t in gold]
    parsed = [Tree.fromstring(line) for line in (out / "valid.parsed").read_text().splitlines()]
    assert [t.leaves() for t in parsed] == [t.leaves() for t in gold]
    info = json.loads((out / "parseval.json").read_text())
    assert info["ill_formed"] == 0 and info["sentences"] == 5 and info["grammar"] is True
    expected = score_trees(gold, [t[0] for t in parsed]).as_dict()  # the same scorer on the written files
    assert info["parseval"] == expected and info["parseval"]["all"]["scored"] == 5
    assert stdout.splitlines()[0].split() == ["P", "R", "F1", "exact", "tags", "scored", "ill-formed"]
    row = stdout.splitlines()[1].split()
    assert row[0] == "all" and float(row[3]) == pytest.approx(expected["all"]["f1"], abs=0.01)
    assert stdout.splitlines()[2].startswith("    <=40")


def test_an_exported_parser_keeps_its_word_vocabulary_and_parses_alike(tiny_parser, tmp_path, capsys):
    import jaxformer
    from jaxformer.parsing import parse_words

    translator, pairs, _ = tiny_parser
    rc, _, err = run_cli(["export", "--model", translator.source, "--out", str(tmp_path / "export")], capsys)
    assert rc == 0, err
    assert (tmp_path / "export" / "vocab.words.json").is_file()
    exported = jaxformer.load(tmp_path / "export")
    sentences = [source.split() for source, _ in pairs[:3]]
    assert exported.tokenizer.serialized == translator.tokenizer.serialized
    assert [p.tree for p in parse_words(exported, sentences)] == [p.tree for p in parse_words(translator, sentences)]


def test_a_sweep_chooses_a_parsers_settings_by_dev_f1(tiny_parser, tmp_path, capsys):
    translator, _, _ = tiny_parser
    common = ["--model", translator.source, "--split", "valid", "--limit", "3"]
    rc, table, err = run_cli(["evaluate", *common, "--sweep", "beam_size=1,2", "--out", str(tmp_path / "s")], capsys)
    assert rc == 0, err
    rows = json.loads((tmp_path / "s" / "sweep.json").read_text())["rows"]
    assert [r["beam_size"] for r in rows] == [1, 2] and all("f1" in r and "bleu" not in r for r in rows)
    assert table.splitlines()[0].split() == ["beam_size", "f1"] and "(parseval F1 " in table.splitlines()[-1]
    rc, _, err = run_cli(["evaluate", *common, "--beam-size", "2", "--out", str(tmp_path / "e")], capsys)
    assert rc == 0, err
    f1 = json.loads((tmp_path / "e" / "parseval.json").read_text())["parseval"]["all"]["f1"]
    assert rows[1]["f1"] == pytest.approx(f1)
