"""CTranslate2 export (`jaxformer.io.ctranslate2`): the same model in CTranslate2 as in jaxformer.

A 2+2-layer d_model 32 model with a 300-piece vocabulary trained on 600 Multi30k sentences. Its weights are
random but not bland (`nontrivial_params`): random biases and LayerNorm gains, and an output row for EOS
that makes it likely now and then, so that greedy outputs differ from sentence to sentence and some end with
EOS before the length limit (the test checks both: it does not compare two identical loops). Run with -s
to see the figures.
"""

from __future__ import annotations

import dataclasses
import json
from itertools import islice

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ctranslate2 = pytest.importorskip("ctranslate2", reason="the CTranslate2 export needs pip install -e '.[interop]'")

from jaxformer import decode  # noqa: E402
from jaxformer.data import BOS_ID, EOS_ID, PAD_ID  # noqa: E402
from jaxformer.io.ctranslate2 import (CTranslate2ExportError, translate_options,  # noqa: E402
                                      write_ctranslate2)
from jaxformer.io import ctranslate2 as ct2_io  # noqa: E402
from jaxformer.model import Transformer, TransformerConfig, init_params  # noqa: E402
from helpers import multi30k_vocabulary  # noqa: E402

EXTRA = 10  # decode.max_extra_len in these tests
N_SENTENCES = 60


def small_config(vocab_size: int, **overrides) -> TransformerConfig:
    settings = dict(vocab_size=vocab_size, d_model=32, d_ff=64, num_heads=4, num_encoder_layers=2,
                    num_decoder_layers=2, max_len=128, dropout_rate=0.0)
    settings.update(overrides)
    return TransformerConfig(**settings)


def nontrivial_params(cfg: TransformerConfig, seed: int = 0, eos_weight: float = 3.0):
    """Random parameters with random biases and LayerNorm gains, and an EOS output row that leans towards the
    last LayerNorm's offset (by `eos_weight`), so that EOS is chosen now and then: with the initialisation
    alone, every output runs to the length limit."""
    rng = np.random.default_rng(seed)

    def perturb(path, x):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if name.endswith("scale"):  # LayerNorm gains
            return (1.0 + rng.normal(0.0, 0.2, np.shape(x))).astype(np.float32)
        if name.endswith("bias"):
            return rng.normal(0.0, 0.2, np.shape(x)).astype(np.float32)
        return np.array(x, np.float32)

    params = jax.tree_util.tree_map_with_path(perturb, init_params(cfg, jax.random.key(seed)))
    tree = params["params"]
    last_norm = tree["decoder_norm"] if cfg.norm == "pre" else tree[f"decoder_{cfg.num_decoder_layers - 1}"][
        "ffn_block"]["norm"]
    if cfg.tie_output:
        embedding = tree["shared_embedding" if cfg.share_embeddings else "target_embedding"]["embedding"]
        embedding[EOS_ID] += eos_weight * last_norm["bias"]
    else:
        tree["output_projection"]["kernel"][:, EOS_ID] += eos_weight * last_norm["bias"]
    return params


def calibrated_params(cfg: TransformerConfig, ids, seed: int = 0):
    """`nontrivial_params` with the EOS weight (of a few) under which the share of greedy outputs of `ids` that
    end before the length limit is closest to a quarter: robust to changes in the initialisation."""
    best = None
    for weight in (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0):
        params = nontrivial_params(cfg, seed, weight)
        outputs = our_greedy(cfg, params, ids)
        share = sum(len(o) < len(s) + EXTRA for o, s in zip(outputs, ids)) / len(ids)
        if best is None or abs(share - 0.25) < best[0]:
            best = (abs(share - 0.25), params)
    return best[1]


@pytest.fixture(scope="module")
def tokenizer(multi30k_dir, tmp_path_factory):
    return multi30k_vocabulary(multi30k_dir, 300, 300, tmp_path_factory.mktemp("ct2vocab") / "vocab.model")


@pytest.fixture(scope="module")
def sentences(multi30k_dir):
    with open(multi30k_dir / "val.en", encoding="utf-8") as f:
        return [line.strip() for line in islice(f, N_SENTENCES)]


@pytest.fixture(scope="module")
def model(tokenizer, sentences):
    """Shared embeddings, untied output projection, attention biases: a random model without them repeats one
    token (with tied embeddings the previous one: its embedding dominates the decoder output). The paper's
    model (tied, no attention biases) is in test_architecture_options_translate_and_score_the_same."""
    cfg = small_config(tokenizer.vocab_size, tie_output=False, attention_bias=True)
    return cfg, calibrated_params(cfg, tokenizer.encode(sentences))


@pytest.fixture(scope="module")
def exported(model, tokenizer, tmp_path_factory):
    cfg, params = model
    root = tmp_path_factory.mktemp("ct2")
    return {q: write_ctranslate2(root / q, cfg, params, tokenizer, {"beam_size": 4, "max_extra_len": EXTRA},
                                 quantization=q) for q in ("float32", "int8")}


def engine(path) -> "ctranslate2.Translator":
    """One thread: on a busy machine CTranslate2's OpenMP threads wait for each other's cores."""
    return ctranslate2.Translator(str(path), device="cpu", inter_threads=1, intra_threads=1)


def padded_sources(ids):
    src = np.full((len(ids), max(map(len, ids)) + 1), PAD_ID, np.int32)
    for row, seq in enumerate(ids):
        src[row, :len(seq)] = seq
        src[row, len(seq)] = EOS_ID
    return src


def our_greedy(cfg, params, ids) -> list[list[int]]:
    tokens = np.asarray(decode.greedy_search(cfg, params, padded_sources(ids), max_extra_len=EXTRA))
    out = []
    for row in tokens.tolist():
        out.append(row[:row.index(EOS_ID)] if EOS_ID in row else [t for t in row if t != PAD_ID])
    return out


def ct2_translate(translator, tokenizer, ids, cfg, **settings) -> list[list[str]]:
    """CTranslate2's translations of ids, each batch of equal source length with our length limit."""
    out = [None] * len(ids)
    by_length = {}
    for i, seq in enumerate(ids):
        by_length.setdefault(len(seq), []).append(i)
    for length, rows in by_length.items():
        options = translate_options({"max_extra_len": EXTRA, **settings}, cfg.max_len, length, tokenizer)
        results = translator.translate_batch([[tokenizer.id_to_piece(t) for t in ids[i]] for i in rows], **options)
        for i, result in zip(rows, results):
            out[i] = result.hypotheses[0]
    return out


def pieces(tokenizer, ids):
    return [tokenizer.id_to_piece(t) for t in ids]


def teacher_forced_log_probs(cfg, params, src_ids, tgt_ids):
    """Our log-probs (full-vocabulary log-softmax) of each target token, EOS included."""
    src = padded_sources(src_ids)
    tgt_out = padded_sources(tgt_ids)  # tokens + EOS
    tgt_in = np.where(tgt_out == PAD_ID, PAD_ID, np.concatenate(
        [np.full((len(tgt_ids), 1), BOS_ID), tgt_out[:, :-1]], axis=1)).astype(np.int32)
    log_probs = np.asarray(jax.nn.log_softmax(Transformer(cfg).apply(params, jnp.asarray(src),
                                                                     jnp.asarray(tgt_in)), axis=-1))
    return [log_probs[row, np.arange(len(seq) + 1), seq + [EOS_ID]] for row, seq in enumerate(tgt_ids)]


def max_score_difference(translator, tokenizer, cfg, params, src_ids, tgt_ids) -> float:
    results = translator.score_batch([pieces(tokenizer, s) for s in src_ids], [pieces(tokenizer, t) for t in tgt_ids])
    ours = teacher_forced_log_probs(cfg, params, src_ids, tgt_ids)
    worst = 0.0
    for mine, theirs in zip(ours, results):
        assert len(theirs.log_probs) == len(mine)
        worst = max(worst, float(np.max(np.abs(np.asarray(theirs.log_probs) - mine))))
    return worst


# ----------------------------------------------------------------------------- the directory

def test_the_directory_holds_the_model_vocabulary_and_readme(exported, model, tokenizer):
    out = exported["float32"]
    assert {"model.bin", "config.json", "shared_vocabulary.json", ct2_io.SPM_FILE, ct2_io.META_FILE,
            ct2_io.README_FILE} <= {p.name for p in out.iterdir()}
    assert not list(out.parent.glob(".*tmp*"))  # the temporary directory was renamed, not left behind
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == ("<s>", "</s>", "<unk>")
    assert config["decoder_start_token"] == "<s>" and config["add_source_eos"] and not config["add_source_bos"]
    assert config["layer_norm_epsilon"] == pytest.approx(1e-6)
    vocabulary = json.loads((out / "shared_vocabulary.json").read_text())
    assert vocabulary == [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    assert (out / ct2_io.SPM_FILE).read_bytes() == tokenizer.serialized
    meta = json.loads((out / ct2_io.META_FILE).read_text())
    assert meta["model"] == model[0].to_dict() and meta["decode"]["max_extra_len"] == EXTRA
    assert meta["translate_options"]["beam_size"] == 4
    readme = (out / ct2_io.README_FILE).read_text()
    assert "ctranslate2.Translator" in readme and "sp.decode" in readme
    # the shared embedding and the position table are stored once: CTranslate2 aliased the decoder's copies
    cfg, params = model
    one_copy = 4 * (sum(x.size for x in jax.tree.leaves(params)) + 2 * cfg.max_len * cfg.d_model)
    assert (out / "model.bin").stat().st_size < one_copy + 2 * cfg.vocab_size * cfg.d_model


def test_the_readme_lines_translate(exported, sentences, monkeypatch):
    """The README's snippet, run as written from the directory's parent, translates (with beam search)."""
    out = exported["float32"]
    snippet = (out / ct2_io.README_FILE).read_text().split("```python\n")[1].split("```")[0]
    snippet = snippet.replace('sources = ["A man is riding a horse."]', f"sources = {sentences[:3]!r}")
    snippet = snippet.replace("print(", "printed = (")
    scope: dict = {}
    monkeypatch.chdir(out.parent)
    exec(snippet, scope)  # noqa: S102 - our own README
    assert len(scope["printed"]) == 3 and all(isinstance(t, str) and t for t in scope["printed"])


# ----------------------------------------------------------------------------- same model

def test_greedy_translations_are_identical_to_ours(exported, model, tokenizer, sentences):
    cfg, params = model
    ids = tokenizer.encode(sentences)
    ours = our_greedy(cfg, params, ids)
    theirs = ct2_translate(engine(exported["float32"]), tokenizer, ids, cfg, beam_size=1)
    # not a degenerate model: outputs differ, are not one token repeated, and some end with EOS before the limit
    finished = sum(len(o) < len(s) + EXTRA for o, s in zip(ours, ids))
    distinct = len({tuple(o) for o in ours})
    varied = sum(len(set(o)) >= 4 for o in ours)
    print(f"\nctranslate2 greedy: {sum(pieces(tokenizer, o) == t for o, t in zip(ours, theirs))} of {len(ids)} "
          f"identical; {distinct} distinct outputs, {varied} with 4 or more different tokens, {finished} ended by "
          f"EOS before the limit")
    assert distinct >= 0.75 * len(ids) and varied >= len(ids) / 2 and finished >= 5
    assert [pieces(tokenizer, o) for o in ours] == theirs
    # and as text, detokenized by sentencepiece from the pieces as a CTranslate2 user does
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(exported["float32"] / ct2_io.SPM_FILE))
    assert [sp.decode(t) for t in theirs] == tokenizer.decode(ours)


def test_score_batch_matches_our_teacher_forced_log_probs(exported, model, tokenizer, sentences, multi30k_dir):
    cfg, params = model
    with open(multi30k_dir / "val.de", encoding="utf-8") as f:
        references = [line.strip() for line in islice(f, N_SENTENCES)]
    src_ids, tgt_ids = tokenizer.encode(sentences), tokenizer.encode(references)
    worst = max_score_difference(engine(exported["float32"]), tokenizer, cfg, params,
                                 src_ids, tgt_ids)
    print(f"\nctranslate2 float32 score_batch: max |log-prob difference| {worst:.2e} over "
          f"{sum(map(len, tgt_ids)) + len(tgt_ids)} target tokens")
    assert worst < 1e-4


def test_int8_runs_and_mostly_agrees(exported, model, tokenizer, sentences):
    """int8 weights: most translations identical to float32's, the others diverging late. (A random model's
    next-token distributions are flat, so this is a harder test than a trained model's.)"""
    cfg, _ = model
    ids = tokenizer.encode(sentences)
    full = ct2_translate(engine(exported["float32"]), tokenizer, ids, cfg, beam_size=1)
    int8 = ct2_translate(engine(exported["int8"]), tokenizer, ids, cfg, beam_size=1)
    same = sum(a == b for a, b in zip(full, int8))
    first = sum(a[:1] == b[:1] for a, b in zip(full, int8))

    def common_prefix(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n
    prefix = float(np.mean([common_prefix(a, b) / max(len(a), 1) for a, b in zip(full, int8)]))
    print(f"\nctranslate2 int8 greedy: {same} of {len(ids)} translations identical to float32's, {first} with "
          f"the same first token, {prefix:.0%} of a float32 translation's tokens before the first difference "
          f"(mean)")
    assert json.loads((exported["int8"] / ct2_io.META_FILE).read_text())["quantization"] == "int8"
    assert same >= len(ids) // 3 and first >= 0.8 * len(ids) and prefix >= 0.6


@pytest.mark.parametrize("variant", [
    {},  # the paper's: tied output projection
    {"norm": "pre"},
    {"positional": "learned"},
    {"tie_output": False, "share_embeddings": False},
    {"scale_embeddings": False},
])
def test_architecture_options_translate_and_score_the_same(variant, tokenizer, sentences, tmp_path):
    cfg = small_config(tokenizer.vocab_size, **variant)
    params = nontrivial_params(cfg, seed=1)
    out = write_ctranslate2(tmp_path / "m", cfg, params, tokenizer, {})
    translator = engine(out)
    ids = tokenizer.encode(sentences[:16])
    ours = our_greedy(cfg, params, ids)
    assert ct2_translate(translator, tokenizer, ids, cfg, beam_size=1) == [pieces(tokenizer, o) for o in ours]
    worst = max_score_difference(translator, tokenizer, cfg, params, ids, ours)
    print(f"\nctranslate2 {variant or 'tied'}: greedy identical on {len(ids)}, max |log-prob difference| "
          f"{worst:.2e}")
    assert worst < 1e-4


NEW_OPTIONS = [("activation", "swish"), ("activation", "gelu"), ("attention_bias", False), ("logits_bias", True),
               ("layer_norm_epsilon", 1e-5), ("sinusoid_layout", "halves")]


@pytest.mark.parametrize("name,value", NEW_OPTIONS)
def test_model_options_score_the_same(name, value, tokenizer, sentences, tmp_path):
    cfg = small_config(tokenizer.vocab_size, **{name: value})
    params = nontrivial_params(cfg, seed=2)
    out = write_ctranslate2(tmp_path / "m", cfg, params, tokenizer, {})
    ids = tokenizer.encode(sentences[:16])
    worst = max_score_difference(engine(out), tokenizer, cfg, params, ids,
                                 our_greedy(cfg, params, ids))
    print(f"\nctranslate2 {name}={value!r}: max |log-prob difference| {worst:.2e}")
    assert worst < 1e-4


def test_model_options_reach_the_spec(model, tokenizer):
    """activation, attention_bias, logits_bias, layer_norm_epsilon and sinusoid_layout set what they say in
    CTranslate2's spec."""
    from ctranslate2.specs import common_spec

    cfg, params = model
    tree = jax.tree.map(np.asarray, params)["params"]
    logits_bias = np.linspace(-1, 1, cfg.vocab_size).astype(np.float32)
    new = dataclasses.replace(cfg, activation="gelu", attention_bias=False, logits_bias=True, layer_norm_epsilon=1e-5,
                        sinusoid_layout="halves")
    spec = ct2_io._build_spec(new, {"params": {**tree, "final_logits_bias": logits_bias}}, tokenizer)
    assert spec.encoder.activation == common_spec.Activation.GELU
    assert spec.config.layer_norm_epsilon == 1e-5
    attention = spec.decoder.layer[0].attention
    assert all(isinstance(linear.bias, str) for linear in attention.linear)  # model_spec.OPTIONAL: none
    np.testing.assert_array_equal(spec.decoder.projection.bias, logits_bias)
    table = spec.encoder.position_encodings.encodings
    assert table.shape == (cfg.max_len, cfg.d_model)
    np.testing.assert_allclose(table[7, :cfg.d_model // 2], np.sin(7 / 10000 ** (np.arange(0, cfg.d_model, 2)
                                                                                  / cfg.d_model)), atol=1e-6)
    old = ct2_io._build_spec(cfg, params, tokenizer)  # the defaults (biases: as the config says, or as before)
    assert old.encoder.activation == common_spec.Activation.RELU and old.config.layer_norm_epsilon == 1e-6
    assert isinstance(old.decoder.projection.bias, str)
    with_bias = getattr(cfg, "attention_bias", True)
    assert all(isinstance(linear.bias, np.ndarray) == with_bias for linear in old.decoder.layer[0].attention.linear)


def test_the_epsilon_in_the_config_is_the_one_used(model, tokenizer, sentences, tmp_path):
    """CTranslate2 reads layer_norm_epsilon (its default would be 1e-5): a large one changes the scores."""
    cfg, params = model
    out = write_ctranslate2(tmp_path / "eps", dataclasses.replace(cfg, layer_norm_epsilon=0.5), params, tokenizer, {})
    ids = tokenizer.encode(sentences[:8])
    assert max_score_difference(engine(out), tokenizer, cfg, params, ids, ids) > 1e-2


# ----------------------------------------------------------------------------- bad input

def _snapshot(params):
    return [np.array(x) for x in jax.tree.leaves(params)]


@pytest.mark.parametrize("case", ["quantization", "not_empty", "a_file", "no_vocabulary", "wrong_vocabulary",
                                  "d_k", "d_k_ne_d_v", "missing_param", "save_fails"])
def test_bad_input_is_one_clear_line_and_touches_nothing(case, model, tokenizer, tmp_path, monkeypatch):
    cfg, params = model
    out, kwargs, tok, expect = tmp_path / "out", {}, tokenizer, None
    if case == "quantization":
        kwargs, expect = {"quantization": "int3"}, "unknown quantization 'int3'; choose one of int8"
    elif case == "not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        expect = "exists and is not empty"
    elif case == "a_file":
        out.write_text("mine")
        expect = "exists and is not a directory"
    elif case == "no_vocabulary":
        tok, expect = None, "no vocabulary"
    elif case == "wrong_vocabulary":
        cfg = dataclasses.replace(cfg, vocab_size=cfg.vocab_size + 1)
        expect = f"the vocabulary has {tok.vocab_size} pieces but the model's vocab_size is {cfg.vocab_size}"
    elif case == "d_k":
        cfg, expect = dataclasses.replace(cfg, d_k=16, d_v=16), "model.d_k=16, model.d_v=16"
    elif case == "d_k_ne_d_v":
        cfg, expect = dataclasses.replace(cfg, d_k=8, d_v=16), "needs d_k = d_v = d_model / num_heads"
    elif case == "missing_param":
        cfg, expect = dataclasses.replace(cfg, norm="pre"), "the params tree has no encoder_norm/scale"
    elif case == "save_fails":
        def fail(path):
            raise OSError("disk full")
        monkeypatch.setattr(tok, "save", fail)
        expect = "disk full"
    before = _snapshot(params)
    listing = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises((CTranslate2ExportError, OSError)) as info:
        write_ctranslate2(out, cfg, params, tok, {}, **kwargs)
    message = str(info.value)
    assert expect in message and "\n" not in message, message
    if case != "save_fails":
        assert isinstance(info.value, CTranslate2ExportError)
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # no output, no temporary directory left
    if case == "not_empty":
        assert (out / "keep.txt").read_text() == "mine"
    for a, b in zip(before, _snapshot(params)):
        np.testing.assert_array_equal(a, b)


def test_quantizing_leaves_the_callers_params_as_they_were(model, tokenizer, tmp_path):
    cfg, params = model
    before = _snapshot(params)
    write_ctranslate2(tmp_path / "int8", cfg, params, tokenizer, {}, quantization="int8")
    for a, b in zip(before, _snapshot(params)):
        np.testing.assert_array_equal(a, b)


def test_an_existing_empty_directory_is_filled(model, tokenizer, tmp_path):
    cfg, params = model
    (tmp_path / "out").mkdir()
    write_ctranslate2(tmp_path / "out", cfg, params, tokenizer, {})
    assert (tmp_path / "out" / "model.bin").is_file()


def test_the_cli_exports_a_model_directory_to_ctranslate2(model, tokenizer, tmp_path, capsys):
    from jaxformer import cli
    from jaxformer.io import native
    from jaxformer.translate import Translator

    cfg, params = model
    source = native.write(Translator(Transformer(cfg), params, tokenizer), tmp_path / "export")
    out = tmp_path / "ct2"
    assert cli.main(["export", "--model", str(source), "--format", "ctranslate2", "--quantization", "int8",
                     "--out", str(out)]) == 0
    assert (out / "model.bin").is_file() and (out / "sentencepiece.model").is_file()
    assert cli.main(["export", "--model", str(source), "--format", "onnx", "--out", str(tmp_path / "x")]) == 1
    assert "unknown export format 'onnx'" in capsys.readouterr().err
    assert cli.main(["export", "--model", str(source), "--quantization", "int8", "--out", str(tmp_path / "y")]) == 1
    assert "--quantization applies to --format ctranslate2" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
