"""The one config object that flows from a recipe in `configs/` to every part.

`default_config()` holds every key with its default; a recipe starts from it and
overrides what it changes, so a typo in a recipe or on the command line
(`--config.train.stpes=10`) is an error rather than a silently ignored value.
`decode_settings` merges and checks the decode section; it lives here (not in
translate.py) so that export and translate both use it without importing each other.
"""

from __future__ import annotations

import os
from typing import Mapping

import ml_collections

STOP_RULES = ("bound", "finished")  # decode.stop: beam search's stopping rules (`jaxformer.decode.beam_search`)
DECODE_PARALLEL = ("auto", "split", "batches")  # decode.parallel: how a search uses several local devices
BEST_METRICS = {"bleu": True, "bleu_moses_lc": True, "f1": True, "loss": False,  # train.best_metric: is higher
                "nll": False}  # better? (jaxformer.choose)
DECODED_METRICS = ("bleu", "bleu_moses_lc", "f1")  # best_metric values that need decoded validation sentences
ALL_SENTENCES = -1  # train.eval_bleu_sentences: decode every validation pair


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # --- model: mirrors jaxformer.model.TransformerConfig (vocab_size comes from the tokenizer).
    c.model = m = ml_collections.ConfigDict()
    m.d_model = 512
    m.d_ff = 2048
    m.num_heads = 8
    m.d_k = ml_collections.FieldReference(None, field_type=int)  # per head; None: d_model // num_heads
    m.d_v = ml_collections.FieldReference(None, field_type=int)
    m.num_encoder_layers = 6
    m.num_decoder_layers = 6
    m.dropout_rate = 0.1            # P_drop: residual dropout and embeddings+positions
    m.attention_dropout_rate = 0.0  # not in the paper; an option
    m.relu_dropout_rate = 0.0       # not in the paper; an option
    m.positional = "sinusoidal"     # or "learned" (Table 3 row E)
    m.sinusoid_layout = "interleaved"  # sin at even, cos at odd features (Section 3.5); "halves": sin | cos (Marian)
    m.max_len = 512                 # longest sequence the positions (and decode cache) cover
    m.share_embeddings = True       # one matrix for source and target embeddings
    m.tie_output = True             # ... and for the pre-softmax projection
    m.scale_embeddings = True       # multiply embeddings by sqrt(d_model)
    m.norm = "post"                 # "post" (paper) or "pre"
    m.layer_norm_epsilon = 1e-6     # Marian: 1e-5
    m.activation = "relu"           # the FFN's: "relu" (paper), "swish" (opus-mt), "gelu"
    m.attention_bias = False        # biases on the q/k/v/output projections (not in the paper; Marian has them)
    m.logits_bias = False           # a bias on the output logits (Marian's final_logits_bias)
    m.dtype = "float32"             # compute dtype: "float32" or "bfloat16"; parameters stay float32
    m.attention_impl = "auto"       # "auto": cuDNN flash attention on a CUDA GPU in bf16/fp16 when head size and masks allow, else XLA (logged); "xla", "cudnn", "einsum"

    # --- data
    c.data = d = ml_collections.ConfigDict()
    d.source = "files"              # "hub" (a Hugging Face dataset by name), "files" (local), "synthetic" (offline
                                    # default), "treebank" (parsing: .mrg trees, linearized)
    d.hub_name = "wmt14"            # with source="hub"
    d.hub_config = "de-en"
    d.hub_field = "translation"     # the {lang: text} field of the WMT/Multi30k layout
    d.train_split = "train"
    d.valid_split = "validation"
    d.test_split = "test"
    d.src_lang = "en"
    d.tgt_lang = "de"
    # with source="files": per split a pair of aligned text files, or one .tsv/.jsonl/.parquet file.
    d.train_files = ""              # e.g. "../shared/data/multi30k/train" (+ .en/.de), or "data.tsv"
    d.valid_files = ""
    d.test_files = ""
    d.vocab_size = 8000
    d.vocab_sample_size = 1_000_000  # sentences (both sides), sampled over the whole train split, to train it
    d.vocab_model = ""              # path of an existing vocabulary (a sentencepiece .model, a words .json) to use
    d.vocab_kind = "sentencepiece"  # "sentencepiece" (shared BPE) or "words" (one id per word or tree symbol: parsing)
    d.min_count = 1                 # vocab_kind="words": source words seen fewer times in training are UNK
    d.max_len = 256                 # pairs with a side longer than this (in tokens, with EOS) are skipped
    d.tokens_per_batch = 4096       # batch slots (rows x length, padding included) per side and step, all
                                    # processes together (paper: ~25,000 real tokens); with pack=True over 90%
                                    # of the slots are real tokens, so this is close to the real count
    d.bucket_lengths = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256)  # pack=False: one shape each; pack=True:
                                    # rows of the largest
    d.pack = True                   # several pairs per row, kept apart by segment ids and per-pair positions
                                    # (the same computation as one pair per row, without the padding);
                                    # False: one pair per row in the smallest bucket that holds it
    d.seed = 0                      # each epoch's whole-corpus order and the vocabulary's sample
    d.cache_dir = ""                # token cache (tokenized splits, memory-mapped; keyed by source, vocabulary,
                                    # max_len and shard, so it can be shared between runs, e.g. runs/data_cache);
                                    # "": <train.workdir>/data_cache
    d.prefetch = 4                  # batches made ahead of the device by a background thread (0: none)
    d.synthetic_size = 20_000       # with source="synthetic": training pairs generated
    d.synthetic_dir = "runs/synthetic_data"  # ... written here (a subfolder per size and seed), then read as files
    d.treebank_dir = ""             # with source="treebank": the folder of wsj_NNNN.mrg files (any depth)
    d.treebank_splits = "sample"    # its train/dev/test file ranges: "sample" (1-139/140-159/160-179) or "wsj"
                                    # (sections 02-21/22/23); dev is the "valid" split
    d.treebank_data_dir = "runs/treebank_data"  # the linearized splits are written here (words: <split>.<src_lang>,
                                    # symbols: <split>.<tgt_lang>; a subfolder per treebank), then read as files

    # --- training
    c.train = t = ml_collections.ConfigDict()
    t.workdir = "runs/default"
    t.init_from = ""                # fine-tuning: a jaxformer export directory (e.g. from `jaxformer import-marian`)
                                    # whose parameters, architecture and vocabulary the run starts from; optimizer
                                    # state and schedule start fresh (jaxformer/io/init_from.py)
    t.steps = 100_000
    t.warmup_steps = 4000
    t.lr_scale = 1.0                # lrate = lr_scale * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)
    t.adam_b1 = 0.9
    t.adam_b2 = 0.98
    t.adam_eps = 1e-9
    t.weight_decay = 0.0
    t.grad_clip_norm = 0.0          # 0: no clipping
    t.grad_accum_steps = 1          # micro-batches per update, to reach the paper's batch on fewer devices:
                                    # each is one batch of data.tokens_per_batch (like fairseq's --update-freq)
    t.label_smoothing = 0.1
    t.seed = 0
    t.log_every = 100
    t.eval_every = 1000
    t.eval_bleu_sentences = ALL_SENTENCES  # validation sentences decoded for BLEU at each eval: -1 all of
    #                                 them, N > 0 the first N, 0 none; a parser (data.vocab_kind="words") scores
    #                                 their parseval F1 instead. Each validation records its cost (eval_seconds,
    #                                 eval_share: of the run's time so far): keep that share at or below 0.1
    #                                 by eval_every, or else a smaller N
    t.bleu_tokenize = "13a"         # sacreBLEU tokenizer of the validation BLEU; "char" where a sentence is one word
    t.valid_tok_refs = ""           # lowercased Moses-tokenized references, one per valid pair (e.g. ../shared/data/
    #                                 multi30k/tok/val.lc.norm.tok.de): validation also scores bleu_moses_lc
    #                                 (jaxformer.bleu.moses_lc_bleu); "": off
    t.checkpoint_every_steps = 1000
    t.checkpoint_every_minutes = 0.0  # 0: by steps only
    t.keep_checkpoints = 5
    t.average_last = 5              # checkpoints averaged for the final model (paper: 5 base, 20 big)
    t.best_metric = "auto"          # the validation metric that chooses the best step: "bleu", "bleu_moses_lc"
    #                                 (needs valid_tok_refs) or a parser's "f1" (higher is better), "loss" or
    #                                 "nll" (lower); "auto": bleu (a parser: f1) when eval_bleu_sentences is not
    #                                 0, else nll
    t.keep_best = 0                 # the K best checkpoints by best_metric, kept besides the last ones (every
    #                                 validation then saves a checkpoint); they give --best / --average-best
    t.early_stopping_patience = 0   # stop after this many validations without improvement; 0: never
    t.stop_after_minutes = 0.0      # stop (validate, save) once this many minutes of wall clock are spent,
    #                                 counted over resumes (fairseq's --stop-time-hours); 0: no time budget
    t.async_checkpointing = True
    t.progress_bar = True
    t.plot = True                   # write curves.png into the workdir
    t.distributed = "auto"          # jax.distributed.initialize(): "auto" (when launched multi-host), "on", "off"
    t.cpu_data_parallel = True      # on a CPU, training makes each core a JAX device and splits batches over them
    #                                 (1.10x the Multi30k step on 2 cores; slower where the parameters dwarf the batch)
    t.shard_optimizer_state = True   # split Adam's moments over the devices, each updating its share (ZeRO-1)
    t.distributed_timeout_s = 300.0  # how long processes wait for the coordinator and each other at start
    t.heartbeat_timeout_s = 100.0   # a process silent this long counts as dead; the others then stop

    # --- decoding
    c.decode = dc = ml_collections.ConfigDict()
    dc.beam_size = 4
    dc.length_penalty = 0.6         # alpha in ((5 + len) / 6) ** alpha
    dc.max_extra_len = 50           # output at most input length + this
    dc.batch_size = 64
    dc.stop = "bound"               # beam search stops a sentence when no live beam can beat its best ("bound"),
    #                                 or once it has beam_size finished hypotheses ("finished": fairseq, CTranslate2)
    dc.parallel = "auto"            # several local devices: "split" each batch over them (one search in lockstep),
    #                                 "batches" (each device its own batches, no per-step collective), "auto":
    #                                 batches on CPU devices given 4+ batches each, else split
    return c


def load_recipe(path) -> ml_collections.ConfigDict:
    """`get_config()` of the recipe file at `path` (a configs/*.py, which is not a package: loaded by path)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(path)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


# Model options added after models were saved without them: a saved config that lacks the key was trained
# with this value (before `attention_bias` existed, the attention projections always had biases).
LEGACY_MODEL_VALUES = {"attention_bias": True}


def saved_model_values(saved: Mapping) -> dict:
    """A saved model section (run config.json or export) with the values of keys it predates filled in."""
    values = dict(saved)
    for key, value in LEGACY_MODEL_VALUES.items():
        values.setdefault(key, value)
    return values


def check_train_config(train_cfg) -> None:
    """Reject bad `train.*` values up front, naming the key."""
    def need(ok: bool, key: str, what: str):
        if not ok:
            raise ValueError(f"train.{key}={train_cfg[key]!r}: {what}")

    t = train_cfg
    need(t.steps >= 1, "steps", "must be >= 1")
    need(t.warmup_steps >= 1, "warmup_steps", "must be >= 1 (the schedule divides by it)")
    need(t.lr_scale > 0, "lr_scale", "must be > 0")
    need(0 <= t.adam_b1 < 1, "adam_b1", "must be in [0, 1)")
    need(0 <= t.adam_b2 < 1, "adam_b2", "must be in [0, 1)")
    need(t.adam_eps > 0, "adam_eps", "must be > 0")
    need(t.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(t.grad_clip_norm >= 0, "grad_clip_norm", "must be >= 0 (0: no clipping)")
    need(t.grad_accum_steps >= 1, "grad_accum_steps", "must be >= 1")
    need(0 <= t.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
    need(t.log_every >= 1, "log_every", "must be >= 1")
    need(t.eval_every >= 0, "eval_every", "must be >= 0 (0: only at the end)")
    need(t.eval_bleu_sentences >= ALL_SENTENCES, "eval_bleu_sentences",
         f"must be {ALL_SENTENCES} (all validation sentences), 0 (no BLEU) or N > 0 (the first N)")
    need(t.checkpoint_every_steps >= 0, "checkpoint_every_steps", "must be >= 0 (0: not by steps)")
    need(t.checkpoint_every_minutes >= 0, "checkpoint_every_minutes", "must be >= 0 (0: not by time)")
    need(t.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
    need(t.average_last >= 1, "average_last", "must be >= 1 (1: no averaging)")
    need(t.average_last <= t.keep_checkpoints, "average_last",
         f"cannot average more checkpoints than are kept (train.keep_checkpoints={t.keep_checkpoints})")
    need(t.best_metric == "auto" or t.best_metric in BEST_METRICS, "best_metric",
         f"must be auto, {', '.join(BEST_METRICS)}")
    need(t.best_metric not in DECODED_METRICS or t.eval_bleu_sentences != 0, "best_metric",
         f"needs validation BLEU (a parser: F1) of decoded sentences: set train.eval_bleu_sentences to "
         f"{ALL_SENTENCES} (all) or N > 0, or choose by loss or nll")
    tok_refs = str(t.get("valid_tok_refs", "") or "")
    need(not tok_refs or os.path.isfile(tok_refs), "valid_tok_refs",
         "no such file (give the valid split's lowercased Moses-tokenized references, e.g. "
         "../shared/data/multi30k/tok/val.lc.norm.tok.de)")
    need(t.best_metric != "bleu_moses_lc" or bool(tok_refs), "best_metric",
         "needs train.valid_tok_refs (the valid split's lowercased Moses-tokenized references)")
    need(t.keep_best >= 0, "keep_best", "must be >= 0 (0: keep only the last checkpoints)")
    need(t.early_stopping_patience >= 0, "early_stopping_patience", "must be >= 0 (0: never stop early)")
    need(t.early_stopping_patience == 0 or t.eval_every > 0, "early_stopping_patience",
         "needs validations during training: set train.eval_every > 0")
    need(t.stop_after_minutes >= 0, "stop_after_minutes", "must be >= 0 (minutes; 0: no time budget)")
    need(t.distributed in ("auto", "on", "off"), "distributed", "must be 'auto', 'on' or 'off'")
    need(t.distributed_timeout_s > 0, "distributed_timeout_s", "must be > 0 (seconds)")
    need(t.heartbeat_timeout_s > 0, "heartbeat_timeout_s", "must be > 0 (seconds)")
    need(bool(str(t.workdir)), "workdir", "must name a directory")
    from sacrebleu.metrics import BLEU

    need(t.bleu_tokenize in BLEU.TOKENIZERS, "bleu_tokenize",
         f"must be one of sacreBLEU's tokenizers: {', '.join(BLEU.TOKENIZERS)}")


def decode_settings(decode_cfg: Mapping | None = None, **overrides) -> dict:
    """The decode section's defaults, updated by `decode_cfg` (a ConfigDict or dict), then by non-None overrides."""
    settings = default_config().decode.to_dict()
    if decode_cfg is not None:
        items = decode_cfg.to_dict() if hasattr(decode_cfg, "to_dict") else dict(decode_cfg)
        settings.update(items)
    unknown = sorted(set(overrides) - set(settings))
    if unknown:
        raise TypeError(f"unknown decode option(s) {', '.join(unknown)}; known: {', '.join(sorted(settings))}")
    settings.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("beam_size", "batch_size"):
        if int(settings[key]) < 1:
            raise ValueError(f"decode.{key} must be >= 1, got {settings[key]}")
    if int(settings["max_extra_len"]) < 0:
        raise ValueError(f"decode.max_extra_len must be >= 0, got {settings['max_extra_len']}")
    for key, choices in (("stop", STOP_RULES), ("parallel", DECODE_PARALLEL)):
        if settings[key] not in choices:
            raise ValueError(f"decode.{key}: unknown option {settings[key]!r}; choose one of {', '.join(choices)}")
    return settings


def check_lengths(config: ml_collections.ConfigDict) -> None:
    """Refuse a position table (`model.max_len`) shorter than the longest training batch.

    Rows are padded to a bucket of `data.bucket_lengths`: the smallest one holding `data.max_len` (pairs
    longer than it, or than the largest bucket, are skipped), or the largest with `data.pack`. Positions
    past the table would otherwise surface later as a NaN loss. (Decoding caps its output at the table
    instead: see `jaxformer.translate`.)
    """
    buckets = sorted(int(n) for n in config.data.bucket_lengths)
    if not buckets:
        return  # the data pipeline names this error
    cap = min(int(config.data.max_len), buckets[-1])
    longest = buckets[-1] if config.data.pack else next(n for n in buckets if n >= cap)
    if int(config.model.max_len) < longest:
        raise ValueError(f"model.max_len={config.model.max_len} is shorter than the longest training batch, "
                         f"{longest} tokens (data.bucket_lengths={tuple(config.data.bucket_lengths)}, "
                         f"data.max_len={config.data.max_len}{', data.pack=True' if config.data.pack else ''}): "
                         f"raise model.max_len to at least {longest}, or lower data.max_len")
