"""Marian export, proven against transformers: a jaxformer model as training makes it -> MarianMTModel.

The model is random, with the shared sentencepiece vocabulary of conftest's `multi30k_tokenizer`; its
logits, greedy outputs and tokenizer are compared with transformers' on the exported directory. A round trip
of an imported Marian model: test_marian_import.py.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxformer.data import MarianVocab  # noqa: E402
from jaxformer.io.marian_export import write_marian  # noqa: E402
from jaxformer.io.marian_import import MarianFormatError  # noqa: E402
from jaxformer.model import Transformer, TransformerConfig, init_params  # noqa: E402
from jaxformer.translate import Translator, translate_ids  # noqa: E402
from helpers import UNKNOWN, generate, hf_logits, lines, max_logit_difference, our_logits, short_pairs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest's: torch on one thread in this module


# ------------------------------------------------------------------------------------------------ export

@pytest.fixture(scope="module")
def native(multi30k_tokenizer, tmp_path_factory):
    """A jaxformer model as training makes it (interleaved sinusoids, LayerNorm eps 1e-6, no attention or
    logits biases), random, with its shared sentencepiece vocabulary, exported to Marian."""
    config = TransformerConfig(vocab_size=multi30k_tokenizer.vocab_size, d_model=32, d_ff=64, num_heads=4,
                               num_encoder_layers=2, num_decoder_layers=2, max_len=48, activation="relu")
    tree = jax.device_get(init_params(config, jax.random.key(4)))["params"]
    # A trained model seldom emits <unk>, which transformers' decode drops where jaxformer writes " ⁇ ": zero its row.
    tree["shared_embedding"]["embedding"] = np.asarray(tree["shared_embedding"]["embedding"]).copy()
    tree["shared_embedding"]["embedding"][1] = 0.0
    params = {"params": tree}
    out = write_marian(tmp_path_factory.mktemp("native") / "marian", config, params, multi30k_tokenizer,
                       {"beam_size": 1}, languages=("en", "de"))
    return config, params, multi30k_tokenizer, out


def test_export_loads_in_transformers_with_every_weight(native):
    from transformers import MarianMTModel

    _, _, _, out = native
    _, info = MarianMTModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    config = json.loads((out / "config.json").read_text())
    assert (config["activation_function"], config["scale_embedding"], config["static_position_embeddings"],
            config["pad_token_id"], config["decoder_start_token_id"], config["eos_token_id"]) == (
        "relu", True, True, config["vocab_size"] - 1, config["vocab_size"] - 1, 0)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["num_beams"] == 1 and generation["bad_words_ids"] == [[config["vocab_size"] - 1]]


def test_exported_logits_match_and_the_epsilon_is_measured(native, multi30k_dir):
    """MarianMTModel's LayerNorms use 1e-5 where this model was trained with 1e-6; the weights are exported
    as they are. The difference that makes is measured beside float32's own noise (transformers in float32
    against itself in float64)."""
    from transformers import MarianMTModel, MarianTokenizer

    config, params, tokenizer, out = native
    model, tok = MarianMTModel.from_pretrained(out).eval(), MarianTokenizer.from_pretrained(out)
    sources, targets = short_pairs(multi30k_dir, "val", 8, 400)
    hf, _, lens = hf_logits(model, tok, sources, targets)
    hf64, _, _ = hf_logits(model.double(), tok, sources, targets)
    model.float()
    noise = max(float(np.max(np.abs(hf[i, :n] - hf64[i, :n]))) for i, n in enumerate(lens))
    to_ours = MarianVocab.from_sentencepiece(tokenizer).ids.to_ours
    diffs = {}
    for eps in (1e-6, 1e-5):
        bundle = (Transformer(TransformerConfig(**{**config.to_dict(), "layer_norm_epsilon": eps})), params, tokenizer)
        diffs[eps] = max_logit_difference(hf, our_logits(bundle, sources, targets)[0], lens, to_ours)
    print(f"exported model, max |logit difference| vs MarianMTModel: jaxformer with eps 1e-6 (as trained) "
          f"{diffs[1e-6]:.2e}, with eps 1e-5 (Marian's) {diffs[1e-5]:.2e}; MarianMTModel float32 vs float64 "
          f"{noise:.2e}")
    assert diffs[1e-6] < 1e-4 and diffs[1e-5] < 1e-4


def test_exported_tokenizer_greedy_and_pipeline_text_equal_jaxformer(native, multi30k_dir):
    from transformers import MarianMTModel, MarianTokenizer, pipeline

    config, params, tokenizer, out = native
    model, tok = MarianMTModel.from_pretrained(out).eval(), MarianTokenizer.from_pretrained(out)
    vocab = MarianVocab.from_sentencepiece(tokenizer)  # only to read jaxformer's ids as Marian's
    sentences = lines(multi30k_dir, "test2016.en", 100) + UNKNOWN[:4]
    short = [s for s in sentences if len(tokenizer.encode([s])[0]) < 40]  # transformers fails past the positions
    for text, ids in zip(sentences, tokenizer.encode(sentences)):  # the jaxformer Tokenizer's own ids
        assert vocab.marian_ids(ids) + [0] == tok(text)["input_ids"], text
    sources = short[:60]
    jmodel = Transformer(config)
    theirs = generate(model, tok, sources, num_beams=1, max_new_tokens=config.max_len)
    mine = translate_ids(jmodel, params, tokenizer.encode(sources), beam_size=1, max_extra_len=50, batch_size=64)
    assert [vocab.marian_ids(m) for m in mine] == theirs
    assert len({tuple(t) for t in theirs}) >= 20
    try:
        texts = [r["translation_text"] for r in pipeline("translation", model=str(out))(sources, batch_size=16)]
    except KeyError:  # transformers 5 removed pipeline("translation"); it ran the tokenizer, `generate` with the
        # directory's generation_config.json and nothing else, and decode without special tokens: that, then
        batch = tok(sources, return_tensors="pt", padding=True)
        with torch.no_grad():
            texts = tok.batch_decode(model.generate(**batch), skip_special_tokens=True)
    assert texts == Translator(jmodel, params, tokenizer, {"beam_size": 1}).translate(sources)


def test_a_shared_embedding_with_an_untied_output_layer_exports(native, multi30k_dir, tmp_path):
    from transformers import MarianMTModel, MarianTokenizer

    config, _, tokenizer, _ = native
    config = TransformerConfig(**{**config.to_dict(), "tie_output": False})
    params = init_params(config, jax.random.key(5))
    out = write_marian(tmp_path / "marian", config, params, tokenizer)
    model, info = MarianMTModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    sources, targets = short_pairs(multi30k_dir, "val", 6, 500)
    hf, _, lens = hf_logits(model.eval(), MarianTokenizer.from_pretrained(out), sources, targets)
    ours, _ = our_logits((Transformer(config), params, tokenizer), sources, targets)
    assert max_logit_difference(hf, ours, lens, MarianVocab.from_sentencepiece(tokenizer).ids.to_ours) < 1e-4


@pytest.mark.parametrize("option, message", [
    ({"norm": "pre"}, "model.norm='pre'"),
    ({"positional": "learned"}, "model.positional='learned'"),
    ({"d_k": 4, "d_v": 4}, "model.d_k=4"),
])
def test_export_refuses_what_marian_cannot_express(native, tmp_path, option, message):
    config, params, tokenizer, _ = native
    config = TransformerConfig(**{**config.to_dict(), **option})  # refused before its parameters are read
    with pytest.raises(MarianFormatError, match=message):
        write_marian(tmp_path / "out", config, params, tokenizer)
    assert not (tmp_path / "out").exists()


def test_export_into_a_folder_that_holds_files_is_refused(native, tmp_path):
    config, params, tokenizer, _ = native
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(MarianFormatError, match="exists and is not empty"):
        write_marian(tmp_path / "out", config, params, tokenizer)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left beside it
