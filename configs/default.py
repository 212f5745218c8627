"""The offline default: English number words -> German number words, on 2 CPU cores in about 2 minutes.

`python train.py` with no flags runs this; nothing is downloaded. jaxformer.synthetic generates 20,000
training pairs (and 1,000 validation and 1,000 test pairs, all distinct numbers below a million) such as
    "three hundred twenty-one thousand four hundred five" -> "dreihunderteinundzwanzigtausendvierhundertfünf".
It is translation in miniature rather than random tokens: German puts units before tens ("twenty-one" ->
"einundzwanzig"), writes the whole number as one compound word that the shared subword vocabulary has to
split and join, and writes 1 as "ein" inside a compound but "eins" at its end, so the model must learn
reordering, composition and context; one wrong piece is a wrong number, so the exact-match rate is a
strict score. As every German sentence is one word, word-level BLEU has no 2-, 3- or 4-grams to count
and is 0 whatever the output, so the validation BLEU is computed on characters (train.bleu_tokenize="char").

Measured on 2 CPU cores (jax 0.10, float32): 1,000 steps in about 2 minutes wall time, ~10,000 target
tokens/s; validation (all 1,000 pairs, beam 4): loss 0.025, perplexity 1.07, token accuracy 100%,
character BLEU 100, exact match 1000/1000, also for the average of the last 5 checkpoints.
"""

from jaxformer.config import default_config


def get_config():
    c = default_config()
    c.model.d_model = 128
    c.model.d_ff = 512
    c.model.num_heads = 4
    c.model.num_encoder_layers = 2
    c.model.num_decoder_layers = 2
    c.model.max_len = 64

    c.data.source = "synthetic"
    c.data.synthetic_size = 20_000
    c.data.vocab_size = 400
    c.data.tokens_per_batch = 2048
    c.data.bucket_lengths = (8, 12, 16, 24)
    c.data.max_len = 24

    c.train.workdir = "runs/default"
    c.train.steps = 1000
    c.train.warmup_steps = 200
    c.train.lr_scale = 0.7
    c.train.log_every = 25
    c.train.eval_every = 250
    c.train.eval_bleu_sentences = -1    # all 1,000 validation pairs: ~0.6 s a validation once the search is compiled
    c.train.bleu_tokenize = "char"
    c.train.checkpoint_every_steps = 50
    c.train.keep_checkpoints = 5
    c.train.average_last = 5
    return c
