"""English constituency parsing (§6.3) in the paper's setting: the licensed WSJ (LDC99T42), ready for an accelerator.

    python train.py --config configs/wsj_parse.py --config.data.treebank_dir=/path/to/treebank_3/parsed/mrg/wsj

Sections 02-21 train (39,832 sentences), 22 is dev (the validation split), 23 is test (2,416); the
treebank's own `wsj/SS/wsj_SSNN.mrg` folders or a flat folder both work. The paper: "a 4-layer transformer
with d_model = 1024 ... on the WSJ portion ... about 40K training sentences ... a vocabulary of 16K tokens ...
dropout (both attention and residual), learning rates and beam size on the Section 22 development set, all
other parameters remained unchanged from the English-to-German base translation model ... we increased the
maximum output length to input length + 300 ... beam size of 21 and alpha = 0.3" (91.3 F1 on section 23,
Table 4). Its dropout and rates were chosen on dev and are not printed: the values below are the base
model's, to be swept on section 22 (jaxformer evaluate --split valid --sweep ...).
"""

from jaxformer.config import default_config


def get_config():
    c = default_config()
    c.model.num_encoder_layers = 4   # paper: 4
    c.model.num_decoder_layers = 4
    c.model.d_model = 1024           # paper: 1024
    c.model.d_ff = 2048              # the base model's (unchanged)
    c.model.num_heads = 8            # the base model's (unchanged)
    c.model.dropout_rate = 0.3       # paper: chosen on dev (not printed); a start for the sweep
    c.model.attention_dropout_rate = 0.1  # paper: attention dropout was chosen on dev too
    c.model.max_len = 704            # input (up to data.max_len) + 300 (sinusoidal positions cost nothing)

    c.data.source = "treebank"
    c.data.treebank_dir = ""         # the licensed treebank: --config.data.treebank_dir=.../parsed/mrg/wsj
    c.data.treebank_splits = "wsj"   # sections 02-21 / 22 / 23
    c.data.src_lang, c.data.tgt_lang = "en", "tree"
    c.data.vocab_kind = "words"      # one entry per word and tree symbol
    c.data.min_count = 2             # paper: 16K tokens; check the logged vocabulary size, raise to 3 to come near
    c.data.max_len = 384             # tree symbols with EOS; longer pairs are counted skips
    c.data.bucket_lengths = (384,)
    c.data.tokens_per_batch = 25_000  # paper: ~25,000 source and target tokens per batch

    c.train.workdir = "runs/wsj_parse"
    c.train.steps = 100_000          # paper: not given for parsing (base translation: 100,000)
    c.train.warmup_steps = 4000      # the base model's
    c.train.log_every = 100
    c.train.eval_every = 1000
    c.train.eval_bleu_sentences = -1  # each validation parses all of section 22 (1,700 sentences; parseval F1)
    c.train.best_metric = "f1"       # paper: settings chosen by dev F1
    c.train.keep_best = 5
    c.train.checkpoint_every_steps = 1000
    c.train.keep_checkpoints = 5
    c.train.average_last = 5         # the base model's

    c.decode.beam_size = 21          # paper: 21
    c.decode.length_penalty = 0.3    # paper: alpha 0.3
    c.decode.max_extra_len = 300     # paper: max output length = input length + 300
    c.decode.batch_size = 64
    return c
