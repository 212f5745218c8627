"""Plain helpers shared by several test modules: tiny models, made-up data, config builders, comparisons.

Fixtures live in conftest.py; a test module imports what it shares from here, never from another test module
(test_structure.py checks). Heavy optional libraries (torch, transformers, sentencepiece) are imported inside the
functions that need them, so that importing this module costs no more than jax.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxformer import checkpoint
from jaxformer.config import default_config
from jaxformer.data import BOS_ID, EOS_ID, PAD_ID, Tokenizer, make_batches
from jaxformer.model import Transformer, TransformerConfig, init_params
from jaxformer.run_config import save_run_config

# ----------------------------------------------------------------------------- tiny models (decode, prefix, sampling)

RANDOM_CFG = TransformerConfig(vocab_size=40, d_model=32, d_ff=64, num_heads=4, num_encoder_layers=1,
                               num_decoder_layers=2, max_len=40, dropout_rate=0.0)
COPY_MAX_TOKENS = 12


_WORDS_RNG = np.random.default_rng(0)
WORDS = ["".join(_WORDS_RNG.choice(list("abcdefgh"), _WORDS_RNG.integers(1, 4))) for _ in range(30)]


def made_up_sentences(n: int, seed: int, max_words: int = 5) -> list[str]:
    """Sentences of 1..max_words made-up words (the copy model's "language")."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(1, max_words + 1))) for _ in range(n)]


@functools.lru_cache(maxsize=None)
def copy_tokenizer() -> Tokenizer:
    """A 48-piece vocabulary over made-up words of the letters a-h."""
    return Tokenizer.train(made_up_sentences(500, seed=0), 48,
                           tempfile.mkdtemp(prefix="jaxformer-test-vocab-") + "/vocab.model")


def copy_batch(rng, vocab_size, batch=64, max_tokens=COPY_MAX_TOKENS):
    """Random sources (tokens + EOS) and their copies as targets."""
    n = rng.integers(1, max_tokens + 1, batch)
    width = max_tokens + 1
    pos = np.arange(width)[None]
    src = np.where(pos < n[:, None], rng.integers(4, vocab_size, (batch, width)), PAD_ID)
    src[np.arange(batch), n] = EOS_ID
    tgt_in = np.concatenate([np.full((batch, 1), BOS_ID), src[:, :-1]], axis=1)
    tgt_in = np.where(src == PAD_ID, PAD_ID, tgt_in)
    return src.astype(np.int32), tgt_in.astype(np.int32), src.astype(np.int32)


@functools.lru_cache(maxsize=None)
def trained_copy_model(steps: int = 500):
    """(model, params, tokenizer): a 1+1-layer d_model=64 Transformer trained (~10 s) to copy its input."""
    tokenizer = copy_tokenizer()
    cfg = TransformerConfig(vocab_size=tokenizer.vocab_size, d_model=64, d_ff=128, num_heads=4,
                            num_encoder_layers=1, num_decoder_layers=1, max_len=64, dropout_rate=0.0)
    model = Transformer(cfg)
    params = init_params(cfg, jax.random.key(0))
    optimizer = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 5e-3, 30, steps))
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, src, tgt_in, tgt_out):
        def loss_fn(p):
            logits = model.apply(p, src, tgt_in)
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, tgt_out)
            weights = tgt_out != PAD_ID
            return jnp.sum(losses * weights) / jnp.sum(weights)
        grads = jax.grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    rng = np.random.default_rng(0)
    for _ in range(steps):
        params, opt_state = step(params, opt_state, *copy_batch(rng, cfg.vocab_size))
    return model, params, tokenizer

def bigram_model(next_log_probs: dict[int, dict[int, float]], floor: float = -30.0):
    """A model whose next-token distribution depends on the previous token only: `next_log_probs[t]` maps
    tokens to their log-prob after t (any other previous token: EOS); unlisted tokens get `floor`.

    Every sub-layer's output projection is zeroed, so the decoder output is LayerNorm of the token's embedding
    (the learned position table is zeroed too): e_t - e_(t+16), whose LayerNorm is 4 (e_t - e_(t+16)). The
    output projection's row t then holds the wanted logits / 4. Returns (model, params, log_probs [16, 16]).
    """
    vocab, d = 16, 32
    cfg = TransformerConfig(vocab_size=vocab, d_model=d, d_ff=32, num_heads=2, num_encoder_layers=1,
                            num_decoder_layers=1, max_len=40, dropout_rate=0.0, tie_output=False,
                            positional="learned")
    params = jax.tree.map(np.array, init_params(cfg, jax.random.key(2)))
    tree = params["params"]
    layer = tree["decoder_0"]
    for name in ("self_attention", "cross_attention"):
        layer[name]["out"]["kernel"][:] = 0.0  # (no bias: model.attention_bias is off)
    layer["ffn"]["wo"]["kernel"][:] = 0.0
    layer["ffn"]["wo"]["bias"][:] = 0.0
    tree["decoder_embedder"]["positions"][:] = 0.0
    embedding = tree["shared_embedding"]["embedding"]
    embedding[:] = 0.0
    logits = np.full((vocab, vocab), floor, np.float32)
    logits[:, EOS_ID] = 0.0
    for token in range(vocab):
        embedding[token, token], embedding[token, token + vocab] = 1.0, -1.0
        if token in next_log_probs:
            logits[token, EOS_ID] = floor
            for nxt, value in next_log_probs[token].items():
                logits[token, nxt] = value
    kernel = tree["output_projection"]["kernel"]
    kernel[:] = 0.0
    kernel[:vocab] = logits / 4.0
    masked = logits.copy()
    masked[:, [PAD_ID, BOS_ID]] = -1e9
    return Transformer(cfg), params, np.asarray(jax.nn.log_softmax(jnp.asarray(masked), axis=-1))


def sources(lengths, width, vocab_size, seed=0):
    """Rows of `n` random tokens + EOS, PAD-padded to `width`."""
    rng = np.random.default_rng(seed)
    src = np.full((len(lengths), width), PAD_ID, np.int32)
    for row, n in enumerate(lengths):
        src[row, :n] = rng.integers(4, vocab_size, n)
        src[row, n] = EOS_ID
    return src


def lengths_of(tokens):
    """Hypothesis lengths counting EOS (everything before the PAD tail)."""
    return (np.asarray(tokens) != PAD_ID).sum(axis=1)


# ----------------------------------------------------------------------------- runs of the copy model (evaluate, bleu)

SENTENCES = made_up_sentences(6, seed=11)  # the copy model's test sentences in test_evaluate, test_export, test_bleu


def make_run(bundle, workdir, *, average_last: int, test_prefix, scales=(5.0, 0.0, 2.0), bleu=None):
    """A run directory whose checkpoints 1, 2, 3 hold the copy model's parameters times `scales` (and, with
    `bleu`, made-up validation BLEU per step, as train.keep_best records it)."""
    from jaxformer.choose import Choice

    choice = Choice(metric="bleu") if bleu else None
    model, params, tokenizer = bundle
    config = default_config()
    for key, value in model.config.to_dict().items():
        if key in config.model:
            config.model[key] = value
    config.data.source, config.data.src_lang, config.data.tgt_lang = "files", "xx", "yy"
    config.data.test_files = str(test_prefix)
    config.train.average_last = average_last
    save_run_config(config, workdir)
    tokenizer.save(str(workdir / "vocab.model"))
    store = checkpoint.CheckpointStore(workdir / "checkpoints", async_save=False)
    for step, scale in enumerate(scales, start=1):
        if choice:
            choice.update(step, bleu[step - 1])
        store.save(step, params=jax.tree.map(lambda x: scale * x, params),
                   opt_state={"count": np.zeros((), np.int32)},
                   rng=jax.random.key_data(jax.random.key(0)), data_state={}, choice=choice)
    store.wait()
    store.close()
    return workdir


def write_split(prefix, sources, references):
    prefix.parent.joinpath(prefix.name + ".xx").write_bytes(b"".join(s + b"\n" for s in sources))
    prefix.parent.joinpath(prefix.name + ".yy").write_bytes(b"".join(r + b"\n" for r in references))


# ----------------------------------------------------------------------------- training on the offline task

def tiny_config(workdir, synthetic_setup, **train):
    """A 1+1-layer, d_model 32 model on the number-words task; one log record per step."""
    data_dir, vocab = synthetic_setup
    c = default_config()
    c.model.update(d_model=32, d_ff=64, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, max_len=32)
    c.data.update(source="synthetic", synthetic_size=2000, synthetic_dir=data_dir, vocab_model=vocab,
                  tokens_per_batch=256, bucket_lengths=(24,), max_len=24)
    c.train.update(workdir=str(workdir), steps=6, warmup_steps=4, lr_scale=2.0, log_every=1, eval_every=0,
                   eval_bleu_sentences=0, checkpoint_every_steps=2, keep_checkpoints=5, average_last=1,
                   progress_bar=False, plot=False)
    c.train.update(train)
    return c


def records_of(workdir, split: str) -> list[dict]:
    """A run's metrics.jsonl records of one split ("train", "valid", "end", ...), in order."""
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


# ----------------------------------------------------------------------------- the data pipeline
# (test_synthetic, test_vocabulary, test_sources, test_cache, test_batching, test_prefetch)

BUCKETS = (8, 16, 24, 32, 48, 64)
CACHE_DIR = None  # the token caches' folder, set by conftest's `token_cache_dir` fixture


def data_config(**data):
    """default_config() with small buckets and a token budget of 1024, `data` overriding; the token cache in
    CACHE_DIR (a data test module uses conftest's `token_cache_dir` fixture, which sets it)."""
    assert CACHE_DIR is not None, "use the token_cache_dir fixture (pytestmark) before calling data_config"
    c = default_config()
    c.data.bucket_lengths = BUCKETS
    c.data.max_len = 64
    c.data.tokens_per_batch = 1024
    c.data.pack = False  # one pair per row unless a test packs
    c.data.cache_dir = CACHE_DIR
    for k, v in data.items():
        c.data[k] = v
    return c


def m30k(multi30k_dir, split="val", **data):
    return data_config(source="files", train_files=str(multi30k_dir / "train"),
                       valid_files=str(multi30k_dir / split), **data)


def iterator(cfg, tok, split="valid", *, process_index=0, process_count=1, repeat=True, shuffle=True, num_devices=1):
    return make_batches(cfg, tok, split, repeat=repeat, shuffle=shuffle, num_devices=num_devices,
                        process_index=process_index, process_count=process_count)


def write_pair(tmp_path, src_lines, tgt_lines, name="corpus"):
    """Write <name>.en / <name>.de as raw bytes (lines may be bytes) and return the prefix."""
    for lang, lines in (("en", src_lines), ("de", tgt_lines)):
        raw = b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines)
        (tmp_path / f"{name}.{lang}").write_bytes(raw)
    return str(tmp_path / name)


def rows_of(batch):
    """Non-pad rows as (src, tgt_in, tgt_out) lists with padding cut off."""
    out = []
    for s, ti, to in zip(batch["src"], batch["tgt_in"], batch["tgt_out"]):
        if not s.any():
            continue
        out.append((s[s != PAD_ID].tolist(), ti[ti != PAD_ID].tolist(), to[to != PAD_ID].tolist()))
    return out


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def multi30k_vocabulary(multi30k_dir: pathlib.Path, pairs: int, pieces: int, path: pathlib.Path):
    """A shared BPE vocabulary of `pieces` pieces trained on the first `pairs` Multi30k training pairs."""
    sentences = []
    for lang in ("en", "de"):
        with open(multi30k_dir / f"train.{lang}", encoding="utf-8") as f:
            sentences += [line.strip() for line in itertools.islice(f, pairs)]
    return Tokenizer.train(sentences, pieces, str(path))


# ----------------------------------------------------------------------------- Marian (test_marian_*, test_finetune)

UNKNOWN = ["Ein Hund 字 läuft 😀 über die Wiese.", "Ω≈ç√∫ a man", "naïve café — «quoted»", "tab\there  two  spaces",
           "x</s>y <unk> z<pad> w", ">>deu<< A man rides a horse.", ">>xx<<", "", " "]


def lines(multi30k_dir, name: str, n: int, start: int = 0) -> list[str]:
    with open(multi30k_dir / name, encoding="utf-8") as f:
        return [line.strip() for line in itertools.islice(f, start, start + n)]


def short_pairs(multi30k_dir, split: str, n: int, start: int = 0) -> tuple[list[str], list[str]]:
    """n pairs of `split` from line `start` on whose sides have at most 50 characters (so that the tiny
    vocabularies' pieces fit the 64 positions)."""
    pairs = [(s, t) for s, t in zip(lines(multi30k_dir, f"{split}.en", 20 * n, start),
                                    lines(multi30k_dir, f"{split}.de", 20 * n, start)) if max(len(s), len(t)) <= 50]
    assert len(pairs) >= n
    return [s for s, _ in pairs[:n]], [t for _, t in pairs[:n]]


def _train_spm(sentences: list[str], size: int) -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buf, model_type="unigram",
                                   vocab_size=size, character_coverage=1.0, hard_vocab_limit=False, minloglevel=2,
                                   num_threads=1)
    return buf.getvalue()


def write_marian_vocabulary(directory: pathlib.Path, multi30k_dir) -> int:
    """source.spm, target.spm and vocab.json as opus-mt has them; returns the vocabulary size."""
    import sentencepiece as spm

    source, target = _train_spm(lines(multi30k_dir, "train.en", 400), 200), _train_spm(
        lines(multi30k_dir, "train.de", 400), 200)
    (directory / "source.spm").write_bytes(source)
    (directory / "target.spm").write_bytes(target)
    vocab = {"</s>": 0, "<unk>": 1}
    for n, proto in enumerate((source, target)):
        sp = spm.SentencePieceProcessor(model_proto=proto)
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            if sp.is_control(i) or sp.is_unknown(i) or piece in vocab or (n == 1 and i % 23 == 5):
                continue  # every 23rd target piece has no id: MarianTokenizer makes it <unk>
            vocab[piece] = len(vocab)
    vocab["<pad>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1), encoding="utf-8")
    return len(vocab)


def build_marian_dir(directory: pathlib.Path, multi30k_dir, activation: str, *, seed: int = 0, std: float = 0.25,
                     eos_bias: float = 2.5, **config_overrides) -> pathlib.Path:
    """A random MarianMTModel saved with its tokenizer, as `save_pretrained` writes opus-mt models."""
    import torch
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    size = write_marian_vocabulary(directory, multi30k_dir)
    pad = size - 1
    torch.manual_seed(seed)
    config = MarianConfig(vocab_size=size, decoder_vocab_size=size, d_model=32, encoder_layers=2, decoder_layers=2,
                          encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                          decoder_ffn_dim=64, max_position_embeddings=64, activation_function=activation,
                          scale_embedding=True, pad_token_id=pad, decoder_start_token_id=pad, eos_token_id=0,
                          forced_eos_token_id=0, init_std=std, **config_overrides)
    model = MarianMTModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
        model.get_input_embeddings().weight[pad].zero_()  # as in opus-mt: the decoder-start (pad) row is zero
        bias = 0.5 * torch.randn(1, size)
        bias[0, 0] += eos_bias  # sentences end now and then
        model.final_logits_bias.copy_(bias)
    model.generation_config.bad_words_ids = [[pad]]
    model.save_pretrained(directory)
    tokenizer = MarianTokenizer(str(directory / "source.spm"), str(directory / "target.spm"),
                                str(directory / "vocab.json"), source_lang="en", target_lang="de")
    tokenizer.save_pretrained(directory)
    return directory


def hf_logits(model, tok, sources: list[str], targets: list[str]) -> tuple[np.ndarray, list[int], list[int]]:
    """Teacher-forced logits [B, T, V'] for decoder inputs pad + target ids; the real lengths of both sides."""
    import torch

    batch = tok(sources, text_target=targets, return_tensors="pt", padding=True)
    labels = batch["labels"]
    pad = model.config.pad_token_id
    start = torch.full((labels.shape[0], 1), model.config.decoder_start_token_id)
    decoder_in = torch.cat([start, labels[:, :-1]], dim=1)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=decoder_in).logits.numpy()
    src_lens = batch["attention_mask"].sum(1).tolist()
    tgt_lens = (labels != pad).sum(1).tolist()
    return logits, src_lens, tgt_lens


def our_logits(bundle, sources: list[str], targets: list[str]) -> tuple[np.ndarray, list[int]]:
    """Our teacher-forced logits [B, T, V'+1] on the same sentences (ids from our tokenizer)."""
    model, params, tokenizer = bundle
    src_ids = [s + [EOS_ID] for s in tokenizer.encode(sources)]
    tgt_ids = [t + [EOS_ID] for t in tokenizer.encode_target(targets)]
    s_len, t_len = max(map(len, src_ids)), max(map(len, tgt_ids))
    src = np.full((len(src_ids), s_len), PAD_ID, np.int32)
    tgt_in = np.full((len(tgt_ids), t_len), PAD_ID, np.int32)
    for i, (s, t) in enumerate(zip(src_ids, tgt_ids)):
        src[i, :len(s)] = s
        tgt_in[i, :len(t)] = [BOS_ID] + t[:-1]
    logits = jax.jit(model.apply)(params, jnp.asarray(src), jnp.asarray(tgt_in))
    return np.asarray(logits), [len(t) for t in tgt_ids]


def max_logit_difference(hf, ours, tgt_lens, to_ours) -> float:
    """Largest |difference| over real target positions, ours reordered to Marian's ids."""
    worst = 0.0
    for i, n in enumerate(tgt_lens):
        worst = max(worst, float(np.max(np.abs(hf[i, :n] - ours[i, :n][:, to_ours]))))
    return worst


def generate(model, tok, sources: list[str], **kw) -> list[list[int]]:
    """transformers' outputs as Marian ids without the decoder start, cut before EOS."""
    import torch

    batch = tok(sources, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, **kw)
    eos = model.config.eos_token_id
    result = []
    for row in out.tolist():
        row = row[1:]
        result.append(row[:row.index(eos)] if eos in row else row)
    return result

