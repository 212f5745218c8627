"""Export and load, translate (library and CLI), sacreBLEU evaluation, attention plots.

Uses the tiny copy model (conftest's `bundle`, trained once per session, in seconds), whose "translation"
of a sentence of made-up words is the sentence itself.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import jaxformer
from jaxformer import cli, decode
from jaxformer import translate as translate_lib
from jaxformer.io import native
from jaxformer.data import BOS_ID, EOS_ID, PAD_ID
from jaxformer.config import default_config
from jaxformer.evaluate import corpus_bleu, evaluate_texts
from jaxformer.translate import Translator, translate_ids, translate_texts
from helpers import SENTENCES, made_up_sentences


def _translator(bundle) -> Translator:
    """The copy model with a run config and decode settings: what the export tests write."""
    model, params, tokenizer = bundle
    config = default_config()
    config.data.src_lang = config.data.tgt_lang = "xx"
    return Translator(model, params, tokenizer, {"beam_size": 4, "batch_size": 8}, config=config)


def _write_native(translator, out):
    return native.write(translator, out, jax_export=native.has_jax_export_support(), jax_export_src_len=16)


@pytest.fixture(scope="module")
def exported(bundle, tmp_path_factory):
    return _write_native(_translator(bundle), tmp_path_factory.mktemp("export") / "model")


needs_flatbuffers = pytest.mark.skipif(not native.has_jax_export_support(),
                                       reason="jax.export serialization needs the flatbuffers package")


def test_export_writes_a_self_contained_directory(exported, bundle):
    model, params, _ = bundle
    files = {"config.json", "params.safetensors", "vocab.model"}
    if native.has_jax_export_support():
        files.add("translate.jax_export")
    assert {p.name for p in exported.iterdir()} == files
    meta = json.loads((exported / "config.json").read_text())
    assert meta["model"] == model.config.to_dict()
    assert meta["decode"] == {"beam_size": 4, "length_penalty": 0.6, "max_extra_len": 50, "batch_size": 8,
                              "stop": "bound", "parallel": "auto"}
    if native.has_jax_export_support():
        assert meta["jax_export"]["src_shape"] == ["batch", 16] and meta["jax_export"]["output_shape"] == ["batch", 64]
        assert meta["jax_export"]["function"] == "beam_search" and meta["jax_export"]["beam_size"] == 4
    arrays = load_file(str(exported / "params.safetensors"))
    assert "decoder_0/cross_attention/key/kernel" in arrays
    assert len(arrays) == len(jax.tree.leaves(params))


def _file_bytes(directory) -> dict[str, bytes]:
    """Every file under `directory`: its relative path -> its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _differing_files(a, b) -> list[str]:
    one, two = _file_bytes(a), _file_bytes(b)
    return sorted(name for name in one.keys() | two.keys() if one.get(name) != two.get(name))


def test_exporting_twice_gives_the_same_bytes(exported, bundle, tmp_path):
    """An export is a function of the model alone: the same parameters give the same files, byte for byte, in
    every format (safetensors on its own writes its metadata in hash order, different from file to file)."""
    import importlib.util

    from jaxformer.io import ctranslate2, marian_export

    translator = _translator(bundle)
    assert _differing_files(exported, _write_native(translator, tmp_path / "native" / exported.name)) == []
    writers = [marian_export.write]
    if importlib.util.find_spec("ctranslate2") is not None:
        writers.append(ctranslate2.write)
    for write in writers:  # the same folder name: CTranslate2's README.md names it
        first, second = (write(translator, tmp_path / write.__module__ / copy / "model") for copy in ("a", "b"))
        assert _file_bytes(first) and _differing_files(first, second) == [], write.__module__


def test_safetensors_files_of_the_same_arrays_are_the_same_bytes(tmp_path):
    """safetensors' own writer orders the metadata by a hash seeded anew for each file (5 keys: 120 orders)."""
    from jaxformer.io.params import save_safetensors

    arrays = {"b/kernel": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.ones(3, np.int32)}
    metadata = {name: str(i) for i, name in enumerate(["format", "version", "z", "a", "m"])}
    written = set()
    for i in range(8):
        save_safetensors(arrays, tmp_path / f"{i}.safetensors", metadata)
        written.add((tmp_path / f"{i}.safetensors").read_bytes())
    assert len(written) == 1
    back = load_file(str(tmp_path / "0.safetensors"))
    assert back.keys() == arrays.keys() and all(np.array_equal(back[k], v) for k, v in arrays.items())


def test_load_gives_identical_logits_and_translations(exported, bundle):
    model, params, tokenizer = bundle
    model2, params2, tokenizer2 = jaxformer.load(exported)
    assert model2.config == model.config and tokenizer2.vocab_size == tokenizer.vocab_size
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    src = jnp.asarray([[5, 9, 11, EOS_ID, PAD_ID], [7, 8, EOS_ID, PAD_ID, PAD_ID]])
    tgt = jnp.asarray([[BOS_ID, 5, 9, 11], [BOS_ID, 7, 8, PAD_ID]])
    np.testing.assert_array_equal(model.apply(params, src, tgt), model2.apply(params2, src, tgt))
    assert translate_texts(model2, params2, tokenizer2, SENTENCES) == translate_texts(model, params, tokenizer,
                                                                                      SENTENCES)


@needs_flatbuffers
def test_jax_export_artifact_runs_the_search_for_any_batch_size(exported, bundle):
    model, params, tokenizer = bundle
    fn = native.load_jax_export(exported)  # beam search, beam 4, alpha 0.6: the export's decode settings
    src = np.zeros((8, 16), np.int32)
    for row, ids in enumerate(tokenizer.encode(SENTENCES)):
        src[row, :len(ids) + 1] = ids + [EOS_ID]
    expected = np.asarray(decode.beam_search(model, params, src, beam_size=4, alpha=0.6)[0])
    loaded = jaxformer.load(exported).params
    np.testing.assert_array_equal(fn(loaded, jnp.asarray(src)), expected)
    np.testing.assert_array_equal(fn(loaded, jnp.asarray(src[:3])), expected[:3])


def test_load_explains_what_is_wrong(tmp_path, exported):
    with pytest.raises(native.ExportError, match="not an exported model"):
        native.read(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither an exported model"):
        jaxformer.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        jaxformer.load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="only to a training workdir"):
        jaxformer.load(exported, average_last=5)
    (tmp_path / "params.safetensors").write_bytes((exported / "params.safetensors").read_bytes()[:100])
    (tmp_path / "config.json").write_text((exported / "config.json").read_text())
    (tmp_path / "vocab.model").write_bytes((exported / "vocab.model").read_bytes())
    with pytest.raises(native.ExportError, match="params.safetensors is unreadable"):  # truncated
        jaxformer.load(tmp_path)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(native.ExportError, match="not an export directory"):  # nothing is overwritten
        native.write(jaxformer.load(exported), occupied)
    assert [p.name for p in occupied.iterdir()] == ["notes.txt"]


def test_translate_copies_and_keeps_the_input_order(bundle):
    translator = Translator(*bundle)
    sentences = made_up_sentences(20, seed=3)  # several lengths: sorted into batches, then put back in order
    outputs = translator(sentences, batch_size=8)
    assert len(outputs) == 20
    assert sum(o == s for o, s in zip(outputs, sentences)) >= 18
    one_by_one = [translator(s, batch_size=8) for s in sentences[:3]]  # a str in, a str out
    assert one_by_one == outputs[:3]
    greedy = translator(sentences, beam_size=1, batch_size=8)
    assert sum(o == s for o, s in zip(greedy, sentences)) >= 18



@pytest.mark.parametrize("parallel", ["split", "batches"])
def test_translate_over_the_devices_gives_the_one_device_result(bundle, parallel):
    # conftest gives this process 4 CPU devices. "split": each batch searched split over them (rows rounded
    # up to a multiple of 4 with all-PAD filler rows); "batches": each device its own batches (the one batch
    # of 7 cut into 4). Either way the tokens equal one search of all 7 on one device.
    assert jax.local_device_count() == 4
    model, params, tokenizer = bundle
    sources = tokenizer.encode(made_up_sentences(7, seed=5))
    split = {beam: translate_ids(model, params, sources, beam_size=beam, batch_size=8, parallel=parallel)
             for beam in (1, 4)}
    src_len = max(len(ids) for ids in sources) + 1
    src = np.full((len(sources), src_len), PAD_ID, np.int32)
    for row, ids in enumerate(sources):
        src[row, :len(ids)], src[row, len(ids)] = ids, EOS_ID
    one_device = jax.device_put(src, jax.devices()[0])
    for beam, tokens in ((1, decode.greedy_search(model, params, one_device)),
                         (4, decode.beam_search(model, params, one_device, beam_size=4)[0])):
        expected = [[t for t in row[:list(row).index(EOS_ID)] if t != PAD_ID] if EOS_ID in row else
                    [t for t in row if t != PAD_ID] for row in np.asarray(tokens).tolist()]
        assert split[beam] == expected


def test_load_gives_a_translator_every_cpu_core_unless_jax_had_started(number_words):
    """`jaxformer.load` in a fresh process makes each core a JAX device (as the CLI does); after JAX has
    started it changes nothing."""
    script = ("import os, sys, jax, jaxformer\n"
              "{before}"
              "t = jaxformer.load(sys.argv[1])\n"
              "print(jax.local_device_count(), os.cpu_count(), t.translate('seven', beam_size=1))\n")
    env = dict(os.environ, XLA_FLAGS=re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                                            os.environ.get("XLA_FLAGS", "")))
    for before, expected in (("", os.cpu_count()), ("jax.devices()\n", 1)):
        result = subprocess.run([sys.executable, "-c", script.format(before=before), str(number_words.source)],
                                capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        devices, cores, text = result.stdout.split(maxsplit=2)
        assert int(devices) == expected and text.strip() == number_words.translate("seven", beam_size=1)


def test_balanced_batches_give_every_device_as_many_batches_and_keep_every_sentence():
    chunks = [list(range(start, min(start + 8, 21))) for start in range(0, 21, 8)]  # 8, 8, 5 sentences
    balanced = translate_lib._balanced(chunks, 4)
    assert [len(c) for c in balanced] == [8, 8, 3, 2]  # the last batch cut in 2: one batch per device
    assert sum(balanced, []) == list(range(21))
    assert translate_lib._balanced(chunks, 3) == chunks  # already a multiple of the devices
    assert translate_lib._balanced([[0, 1], [2]], 4) == [[0, 1], [2]]  # too few sentences to cut
    assert translate_lib._parallel_mode("auto", None) == "one"
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))  # conftest's 4 CPU devices
    assert translate_lib._parallel_mode("auto", mesh, 16) == "batches"  # 4 a device: each compiles its own
    assert translate_lib._parallel_mode("auto", mesh, 15) == "split"  # fewer: one program, split
    assert translate_lib._parallel_mode("split", mesh, 100) == "split"


def test_translate_empty_inputs_without_running_the_model(bundle, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the model should not run")
    monkeypatch.setattr(decode, "greedy_search", fail)
    monkeypatch.setattr(decode, "beam_search", fail)
    translator = Translator(*bundle)
    assert translator([]) == []
    assert translator(["", "   "]) == ["", ""]
    assert translator("") == ""


def test_translate_truncates_over_long_input_with_a_warning(bundle, caplog):
    model, params, tokenizer = bundle
    long = " ".join(["a"] * 100)  # 100 tokens: more than max_len - 1 = 63
    assert len(tokenizer.encode([long])[0]) == 100
    with caplog.at_level(logging.WARNING, logger="jaxformer.translate"):
        out = Translator(*bundle)([long, SENTENCES[0]], batch_size=8)
    assert "sentence 0 has 100 tokens" in caplog.text and "first 63 tokens" in caplog.text
    assert len(tokenizer.encode([out[0]])[0]) <= model.config.max_len
    assert out[1] == Translator(*bundle)([SENTENCES[0]], batch_size=8)[0]


def test_translator_unpacks_and_rejects_bad_options(bundle):
    translator = Translator(*bundle, decode={"beam_size": 2})
    model, params, tokenizer = translator
    assert model is bundle[0] and translator.decode["beam_size"] == 2
    with pytest.raises(TypeError, match="unknown decode option"):
        translate_texts(model, params, tokenizer, ["a"], beam=3)
    with pytest.raises(ValueError, match="beam_size must be >= 1"):
        translator(["a"], beam_size=0)


def test_bleu_of_identical_text_is_100_with_the_sacrebleu_signature(bundle):
    refs = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee, nicht wahr?"]
    result = corpus_bleu(refs, refs)
    assert result.score == pytest.approx(100.0)  # (sacreBLEU's geometric mean can give 100.00000000000004)
    assert result.signature.startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert corpus_bleu(["völlig anders"], ["Ein Mann fährt Fahrrad."]).score < 10
    with pytest.raises(ValueError, match="pair up"):
        corpus_bleu(refs, refs[:1])
    # Through the model: the copy model "translates" into its input, so sources as references score 100.
    sentences = made_up_sentences(8, seed=5)
    result = evaluate_texts(Translator(*bundle), sentences, sentences, batch_size=8)
    assert result.hypotheses == Translator(*bundle)(sentences, batch_size=8)
    assert result.score == corpus_bleu(result.hypotheses, sentences).score > 80


def test_cli_translate_evaluate_and_plot(exported, tmp_path, monkeypatch, capsys):
    src = tmp_path / "test.xx"
    src.write_text("".join(s + "\n" for s in SENTENCES))
    out = tmp_path / "out.txt"
    assert cli.main(["translate", "--model", str(exported), "--input", str(src), "--output", str(out)]) == 0
    loaded = jaxformer.load(exported)
    expected = loaded(SENTENCES)
    assert out.read_text().splitlines() == expected

    monkeypatch.setattr("sys.stdin", io.StringIO(SENTENCES[0] + "\n\n" + SENTENCES[1] + "\n"))
    assert cli.main(["translate", "--model", str(exported), "--beam-size", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [loaded(SENTENCES[0], beam_size=1), "", loaded(SENTENCES[1], beam_size=1)]

    assert cli.main(["evaluate", "--model", str(exported), "--src", str(src), "--ref", str(out),
                     "--out", str(tmp_path / "eval")]) == 0
    printed = capsys.readouterr().out
    assert "BLEU = 100.00" in printed and "nrefs:1|case:mixed" in printed
    info = json.loads((tmp_path / "eval" / "bleu.json").read_text())
    assert info["bleu"] == pytest.approx(100.0) and info["num_sentences"] == len(SENTENCES)
    assert (tmp_path / "eval" / "test.hyp").read_text().splitlines() == expected

    png = tmp_path / "attention.png"
    assert cli.main(["plot-attention", "--model", str(exported), "--sentence", SENTENCES[0], "--kind", "all",
                     "--heads", "0,1", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert cli.main(["translate", "--model", str(tmp_path / "missing"), "--input", str(src)]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_attention_maps_are_distributions_labelled_by_pieces(bundle):
    from jaxformer.plotting import attention_maps

    model, params, tokenizer = bundle
    maps = attention_maps(model, params, tokenizer, SENTENCES[0], beam_size=1)
    s, t = len(maps.source_pieces), len(maps.input_pieces)
    assert maps.source_pieces[-1] == "</s>" and maps.input_pieces[0] == "<s>"
    assert maps.weights["encoder"][0].shape == (model.config.num_heads, s, s)
    assert maps.weights["cross"][-1].shape == (model.config.num_heads, t, s)
    for kind in ("encoder", "decoder", "cross"):
        np.testing.assert_allclose(maps.weights[kind][0].sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(np.triu(maps.weights["decoder"][0][0], 1), 0.0)  # causal


def test_workdir_export_with_averaging_and_evaluate_on_the_run_split(bundle, tmp_path, capsys):
    from jaxformer import checkpoint
    from jaxformer.run_config import save_run_config
    from jaxformer.config import default_config

    model, params, tokenizer = bundle
    workdir = tmp_path / "run"
    config = default_config()
    for key, value in model.config.to_dict().items():
        if key in config.model:
            config.model[key] = value
    config.data.source, config.data.src_lang, config.data.tgt_lang = "files", "xx", "yy"
    config.data.test_files = str(tmp_path / "test")
    config.train.bleu_tokenize = "char"
    (tmp_path / "test.xx").write_text("".join(s + "\n" for s in SENTENCES))
    (tmp_path / "test.yy").write_text("".join(s + "\n" for s in SENTENCES))
    save_run_config(config, workdir)
    tokenizer.save(str(workdir / "vocab.model"))
    zeros = jax.tree.map(jnp.zeros_like, params)
    store = checkpoint.CheckpointStore(workdir / "checkpoints", async_save=False)
    for step, p in ((1, zeros), (2, jax.tree.map(lambda x: 2 * x, params))):  # their average is `params`
        store.save(step, params=p, opt_state={"count": np.zeros((), np.int32)},
                   rng=jax.random.key_data(jax.random.key(0)), data_state={})
    store.wait()
    store.close()

    out = tmp_path / "exported"
    assert cli.main(["export", "--workdir", str(workdir), "--average-last", "2", "--out", str(out)]) == 0
    loaded = jaxformer.load(out).params
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    meta = json.loads((out / "config.json").read_text())
    assert meta["data"]["test_files"] == str(tmp_path / "test") and meta["bleu_tokenize"] == "char"

    capsys.readouterr()
    assert cli.main(["evaluate", "--workdir", str(workdir), "--average-last", "2", "--split", "test",
                     "--out", str(tmp_path / "eval")]) == 0
    assert "BLEU = " in capsys.readouterr().out
    info = json.loads((tmp_path / "eval" / "bleu.json").read_text())
    assert info["num_sentences"] == len(SENTENCES) and info["bleu"] > 80
    assert "split 'test'" in info["test_set"] and "tok:char" in info["signature"]  # the run's BLEU tokenizer
    # a data.* override on the command line, spelled as train.py spells it: the test set is read from elsewhere
    (tmp_path / "other.xx").write_text("".join(s + "\n" for s in SENTENCES[:3]))
    (tmp_path / "other.yy").write_text("".join(s + "\n" for s in SENTENCES[:3]))
    assert cli.main(["evaluate", "--workdir", str(workdir), "--average-last", "2",
                     f"--config.data.test_files={tmp_path / 'other'}", "--out", str(tmp_path / "eval2")]) == 0
    assert json.loads((tmp_path / "eval2" / "bleu.json").read_text())["num_sentences"] == 3
    # without --out the scores are printed and the files go into the run
    assert cli.main(["evaluate", "--workdir", str(workdir), "--average-last", "2", "--limit", "2"]) == 0
    assert "BLEU = " in capsys.readouterr().out
    assert json.loads((workdir / "evaluation" / "test" / "bleu.json").read_text())["num_sentences"] == 2


@pytest.mark.parametrize("options", [{}, {"norm": "pre", "positional": "learned"},
                                     {"share_embeddings": False, "tie_output": False, "attention_bias": True,
                                      "logits_bias": True, "d_k": 6, "d_v": 10, "num_encoder_layers": 0}])
def test_the_layout_table_lists_exactly_the_models_parameters(options):
    """`jaxformer.layout.parameters` (what every format iterates) is what `init_params` makes, shape for shape."""
    from flax import traverse_util

    from jaxformer import layout
    from jaxformer.model import TransformerConfig, init_params

    config = TransformerConfig(**{"vocab_size": 40, "d_model": 16, "d_ff": 24, "num_heads": 2, "num_encoder_layers": 2,
                                  "num_decoder_layers": 1, "max_len": 12, **options})
    made = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))["params"]
    assert layout.shapes(config) == {k: v.shape for k, v in traverse_util.flatten_dict(made, sep="/").items()}
    assert all(p.kind in layout.KINDS for p in layout.parameters(config))
