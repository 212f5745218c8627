"""Marian import, proven against transformers: an opus-mt layout -> jaxformer, and back, and bad input.

Small Marian models are built with transformers itself (helpers.build_marian_dir: MarianConfig with swish and
with relu, 2+2 layers, d_model 32), with a vocabulary like opus-mt's: source.spm trained on English and
target.spm on German Multi30k sentences, vocab.json their joint pieces (a few left out, so that pieces without an
id become <unk>), </s> 0, <unk> 1, <pad> last. Their weights are random but far from the initialisation
(LayerNorm gains and biases, logits biases), so that different sentences get different outputs.

A random model repeats itself until the length limit, so the comparisons set both searches' limits equal
(jaxformer's max_extra_len past the position table, transformers' max_new_tokens = the table), and the
beam comparison gives transformers jaxformer's scores (`JaxformerScores`). The export of jaxformer's own
models: test_marian_export.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import time

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxformer  # noqa: E402
from jaxformer.io import native as jaxformer_format  # noqa: E402
from jaxformer.io import marian_export  # noqa: E402
from jaxformer.io.marian_export import write_marian  # noqa: E402
from jaxformer.io.marian_import import MarianFormatError, import_marian  # noqa: E402
from jaxformer.translate import translate_ids  # noqa: E402
from helpers import (UNKNOWN, build_marian_dir, generate, hf_logits, lines, max_logit_difference,  # noqa: E402
                     our_logits, short_pairs)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest's: torch on one thread in this module


# ------------------------------------------------------------------------------------------------ fixtures

_BUILT: dict = {}


def imported_marian(activation: str, multi30k_dir, tmp_path_factory):
    """(HF directory, MarianMTModel, MarianTokenizer, jaxformer export dir, jaxformer (model, params, tokenizer)),
    built once per activation."""
    from transformers import MarianMTModel, MarianTokenizer

    if activation not in _BUILT:
        root = tmp_path_factory.mktemp(f"marian_{activation}")
        hf_dir = build_marian_dir(root / "hf", multi30k_dir, activation)
        out = import_marian(hf_dir, root / "jaxformer")
        _BUILT[activation] = (hf_dir, MarianMTModel.from_pretrained(hf_dir).eval(),
                              MarianTokenizer.from_pretrained(hf_dir), out, tuple(jaxformer_format.read(out)))
    return _BUILT[activation]


@pytest.fixture(scope="module", params=["swish", "relu"])
def marian(request, multi30k_dir, tmp_path_factory):
    return imported_marian(request.param, multi30k_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def swish_marian(multi30k_dir, tmp_path_factory):
    return imported_marian("swish", multi30k_dir, tmp_path_factory)


# ------------------------------------------------------------------------------------------------ import

def test_tokenizer_ids_equal_marian_tokenizers(swish_marian, multi30k_dir):
    _, _, tok, _, (_, _, ours) = swish_marian
    sources = lines(multi30k_dir, "val.en", 110) + UNKNOWN
    targets = lines(multi30k_dir, "val.de", 110) + UNKNOWN
    unk_seen = 0
    for text, ids in zip(sources, ours.encode(sources)):
        expected = tok(text)["input_ids"]
        assert ours.marian_ids(ids) + [tok.eos_token_id] == expected, text
        unk_seen += expected.count(tok.unk_token_id)
    for text, ids in zip(targets, ours.encode_target(targets)):
        assert ours.marian_ids(ids) + [tok.eos_token_id] == tok(text_target=text)["input_ids"], text
    assert unk_seen >= 3  # unknown characters and pieces without an id were exercised
    decoded = [tok.decode(tok(text_target=t)["input_ids"], skip_special_tokens=True) for t in targets[:110]]
    assert ours.decode(ours.encode_target(targets[:110])) == decoded


def test_imported_logits_equal_marian_mt_models(marian, multi30k_dir):
    _, model, tok, out, bundle = marian
    sources, targets = short_pairs(multi30k_dir, "val", 8, 200)
    hf, _, tgt_lens = hf_logits(model, tok, sources, targets)
    ours, our_lens = our_logits(bundle, sources, targets)
    assert our_lens == tgt_lens
    diff = max_logit_difference(hf, ours, tgt_lens, bundle[2].ids.to_ours)
    print(f"max |logit difference| ({model.config.activation_function}): {diff:.2e}")
    assert diff < 1e-4
    config = bundle[0].config
    assert (config.activation, config.logits_bias, config.layer_norm_epsilon, config.sinusoid_layout,
            config.attention_bias) == (model.config.activation_function, True, 1e-5, "halves", True)


def test_greedy_equals_generate(marian, multi30k_dir):
    _, model, tok, _, (jmodel, params, ours) = marian
    sources = lines(multi30k_dir, "val.en", 60)
    limit = jmodel.config.max_len  # both searches stop at the position table: the same limit for every sentence
    theirs = generate(model, tok, sources, num_beams=1, max_new_tokens=limit)
    mine = translate_ids(jmodel, params, ours.encode(sources), beam_size=1, max_extra_len=10 * limit, batch_size=64)
    assert [ours.marian_ids(m) for m in mine] == theirs
    assert len({tuple(t) for t in theirs}) >= 20  # the outputs differ between sentences
    print(f"greedy ({model.config.activation_function}): {len(sources)} sentences identical, "
          f"{len({tuple(t) for t in theirs})} distinct outputs, {sum(len(t) < limit - 1 for t in theirs)} end early")


class JaxformerScores:
    """A transformers logits processor that scores as jaxformer's search does: Marian's pad (jaxformer's BOS)
    masked before the softmax, so the other tokens' log-probabilities are renormalised, and at the length
    limit EOS forced at the cost of its log-probability (transformers' own forced EOS scores it 0)."""

    def __init__(self, pad: int, eos: int, max_length: int):
        self.pad, self.eos, self.max_length = pad, eos, max_length

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.pad] = -float("inf")
        scores = torch.log_softmax(scores, dim=-1)
        if input_ids.shape[-1] == self.max_length - 1:  # the last position: EOS only, scored
            eos = scores[:, self.eos].clone()
            scores.fill_(-float("inf"))
            scores[:, self.eos] = eos
        return scores


def test_beam_search_agrees_where_the_scores_are_the_same(swish_marian, multi30k_dir):
    """Beam 4 in both, with the same scores: length penalty 0 in both (transformers divides by len**penalty,
    jaxformer by ((5 + len) / 6)**alpha), and transformers' pad masking and forced EOS replaced by
    jaxformer's rule (`JaxformerScores`)."""
    from transformers import LogitsProcessorList

    _, model, tok, _, (jmodel, params, ours) = swish_marian
    sources = lines(multi30k_dir, "val.en", 40, 100)
    limit = jmodel.config.max_len
    scores = JaxformerScores(model.config.pad_token_id, model.config.eos_token_id, limit + 1)
    theirs = generate(model, tok, sources, num_beams=4, length_penalty=0.0, max_new_tokens=limit,
                      bad_words_ids=None, forced_eos_token_id=None, logits_processor=LogitsProcessorList([scores]))
    mine = translate_ids(jmodel, params, ours.encode(sources), beam_size=4, length_penalty=0.0,
                         max_extra_len=10 * limit, batch_size=64)
    mine = [ours.marian_ids(m) for m in mine]
    agree = sum(m == t for m, t in zip(mine, theirs))
    print(f"beam 4: {agree} of {len(sources)} best hypotheses agree, {len({tuple(t) for t in theirs})} distinct, "
          f"{sum(len(t) < limit - 1 for t in theirs)} end before the limit")
    assert agree == len(sources) and len({tuple(t) for t in theirs}) >= 20


def test_round_trip_import_then_export_gives_the_same_model(swish_marian, multi30k_dir, tmp_path):
    from transformers import MarianMTModel, MarianTokenizer

    hf_dir, model, tok, out, _ = swish_marian
    back = marian_export.write(jaxformer.load(out), tmp_path / "back")  # what `export --format marian` runs
    again, info = MarianMTModel.from_pretrained(back, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    sources, targets = short_pairs(multi30k_dir, "val", 6, 300)
    first, _, lens = hf_logits(model, tok, sources, targets)
    second, _, _ = hf_logits(again.eval(), MarianTokenizer.from_pretrained(back), sources, targets)
    assert max(float(np.max(np.abs(first[i, :n] - second[i, :n]))) for i, n in enumerate(lens)) < 1e-5
    for name in ("source.spm", "target.spm"):
        assert (back / name).read_bytes() == (hf_dir / name).read_bytes()
    assert json.loads((back / "vocab.json").read_text()) == json.loads((hf_dir / "vocab.json").read_text())
    tokenizer_config = json.loads((back / "tokenizer_config.json").read_text())
    assert (tokenizer_config["source_lang"], tokenizer_config["target_lang"]) == ("en", "de")


@pytest.mark.parametrize("layout", [{"share_encoder_decoder_embeddings": False}, {"tie_word_embeddings": False},
                                    {"share_encoder_decoder_embeddings": False, "tie_word_embeddings": False}],
                         ids=["separate embeddings", "untied output", "all three separate"])
def test_embedding_layouts_import_and_export_exactly(layout, multi30k_dir, tmp_path):
    """transformers 5 ties the embeddings to model.shared only while tie_word_embeddings holds: the import
    reads the matrices the model runs on, and the export writes every name it reads."""
    from transformers import MarianMTModel, MarianTokenizer

    hf_dir = build_marian_dir(tmp_path / "hf", multi30k_dir, "relu", **layout)
    model, tok = MarianMTModel.from_pretrained(hf_dir).eval(), MarianTokenizer.from_pretrained(hf_dir)
    bundle = tuple(jaxformer_format.read(import_marian(hf_dir, tmp_path / "jaxformer")))
    config = bundle[0].config
    assert (config.share_embeddings, config.tie_output) == (False, layout.get("tie_word_embeddings", True))
    sources, targets = short_pairs(multi30k_dir, "val", 6, 200)
    hf, _, lens = hf_logits(model, tok, sources, targets)
    assert max_logit_difference(hf, our_logits(bundle, sources, targets)[0], lens, bundle[2].ids.to_ours) < 1e-4
    again, info = MarianMTModel.from_pretrained(write_marian(tmp_path / "back", config, bundle[1], bundle[2]),
                                                output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert np.array_equal(hf_logits(again.eval(), tok, sources, targets)[0], hf)


def test_imported_model_translates_evaluates_and_plots(swish_marian, multi30k_dir, tmp_path):
    from jaxformer.evaluate import evaluate_texts
    from jaxformer.plotting import attention_maps

    _, model, tok, out, _ = swish_marian
    translator = jaxformer.load(out)
    sources = lines(multi30k_dir, "val.en", 4)
    hf_text = tok.batch_decode(model.generate(**tok(sources, return_tensors="pt", padding=True), num_beams=1,
                                              max_new_tokens=64), skip_special_tokens=True)
    assert translator(sources, beam_size=1, max_extra_len=640) == hf_text
    result = evaluate_texts(translator, sources, lines(multi30k_dir, "val.de", 4), beam_size=1, max_extra_len=640)
    assert 0.0 <= result.score <= 100.0
    maps = attention_maps(translator.model, translator.params, translator.tokenizer, sources[0],
                          translation=hf_text[0])
    assert maps.weights["cross"][0].shape[-1] == len(maps.source_pieces)


def test_torch_bin_is_read_without_running_pickled_code(swish_marian, tmp_path):
    from safetensors.numpy import load_file

    hf_dir, _, _, out, (_, params, _) = swish_marian
    source = tmp_path / "bin"
    shutil.copytree(hf_dir, source)
    state = {k: torch.from_numpy(v) for k, v in load_file(str(source / "model.safetensors")).items()}
    (source / "model.safetensors").unlink()
    torch.save(state, source / "pytorch_model.bin")
    _, params2, _ = jaxformer_format.read(import_marian(source, tmp_path / "from_bin"))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)))

    class Payload:  # a pickle that would run code on load
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"model.shared.weight": Payload()}, source / "pytorch_model.bin")
    with pytest.raises(MarianFormatError, match="weights_only=True"):
        import_marian(source, tmp_path / "evil")


# --------------------------------------------------------------------------------------------- bad input

def _broken(hf_dir: pathlib.Path, tmp_path: pathlib.Path, how: str) -> str:
    source = tmp_path / "src"
    shutil.copytree(hf_dir, source)
    config = json.loads((source / "config.json").read_text())
    if how == "no weights":
        (source / "model.safetensors").unlink()
    elif how == "no vocab.json":
        (source / "vocab.json").unlink()
    elif how == "unknown activation":
        config["activation_function"] = "gelu_new"
    elif how == "shapes contradict the config":
        config.update(encoder_ffn_dim=128, decoder_ffn_dim=128)
    elif how == "more layers than the config":
        config.update(encoder_layers=1)
    elif how == "truncated safetensors":
        data = (source / "model.safetensors").read_bytes()
        (source / "model.safetensors").write_bytes(data[:len(data) // 2])
    elif how == "learned positions":
        config["static_position_embeddings"] = False
    elif how == "separate vocabularies":
        config["share_encoder_decoder_embeddings"] = False
        config["decoder_vocab_size"] = config["vocab_size"] + 5
    elif how == "decoder start is not pad":
        config["decoder_start_token_id"] = 5
    (source / "config.json").write_text(json.dumps(config))
    return str(source)


@pytest.mark.parametrize("how, message", [
    ("no weights", "has no weights"),
    ("no vocab.json", "vocab.json is missing"),
    ("unknown activation", "activation_function 'gelu_new' is not supported"),
    ("shapes contradict the config", r"fc1.weight has shape \(64, 32\) but config.json implies \(128, 32\)"),
    ("more layers than the config", "weights that config.json does not describe: model.decoder.layers|"
                                    "model.encoder.layers.1"),
    ("truncated safetensors", "not a readable safetensors file"),
    ("learned positions", "static_position_embeddings is false"),
    ("separate vocabularies", "separate source and target vocabularies"),
    ("decoder start is not pad", "decoder_start_token_id=5"),
])
def test_bad_input_gets_one_line_and_leaves_nothing(swish_marian, tmp_path, how, message):
    source = _broken(swish_marian[0], tmp_path, how)
    out = tmp_path / "out"
    with pytest.raises(MarianFormatError, match=message) as error:
        import_marian(source, out)
    assert "\n" not in str(error.value)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_an_offline_hub_id_fails_fast_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(MarianFormatError, match="cannot fetch Helsinki-NLP/opus-mt-xx-yy: HF_HUB_OFFLINE") as error:
        import_marian("Helsinki-NLP/opus-mt-xx-yy", tmp_path / "out")
    assert time.monotonic() - start < 20 and "\n" not in str(error.value) and not (tmp_path / "out").exists()
    with pytest.raises(MarianFormatError, match="does not exist"):
        import_marian(str(tmp_path / "no" / "such" / "dir"), tmp_path / "out")


def test_an_output_directory_that_holds_files_is_refused(swish_marian, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(MarianFormatError, match="exists and is not empty"):
        import_marian(swish_marian[0], tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
