"""Multi30k English->German (29,000 image captions): a real translation task sized for a CPU.

    python train.py --config configs/multi30k.py                                  # from the hub
    python train.py --config configs/multi30k.py --config.data.source=files       # from ../shared/data/multi30k

The hub dataset is `bentrevett/multi30k` (fields `en` and `de`, splits train / validation / test, the
2016 Flickr test set); `data.source=files` reads the same text from the local copy that the *_files
keys already name, so that one override is all it takes offline. A 3+3-layer, d_model 256 model with an
8,000-piece shared BPE vocabulary (7.6M parameters), the paper's optimizer, schedule and label smoothing,
scaled down. The issue's 60-minute budget on 2 CPU cores, scaled by PyTorch's small step on the machine
(`benchmarks/train_vs_pytorch.py`; 60 × 0.899 s / 1.4 s = 38.5 min there), gave 2,273 steps of ~2,000
target tokens (~1.0 s/step, about 12 epochs) and scored 38.00 cased / 38.37 lowercased sacreBLEU on
test2016 (benchmarks/README.md): `python benchmarks/multi30k_quality.py --minutes 38.5`. Chosen on val for
that budget: dropout 0.1 (not 0.2), batches of 2,048 slots (not 4,096: twice the updates for the same
tokens and time), the average of the last 5 checkpoints 100 steps apart, beam 4 and alpha 1.0 (the paper's
alpha 0.6 left translations ~7% short of the references). The peak rate, 2.5e-3 at step 400 (lr_scale 0.8),
is the run that met the goal, not a choice val made: the run before (1.7e-3 at step 500, lr_scale 0.6,
another session's machine) scored 0.4 higher on val at the same 2,000 steps but had only 2,000 in its
budget; which rate is better at the budget is not settled. The schedule does not depend on
train.steps, so a longer run is this one resumed; but past ~3,000 steps val stops improving (dropout 0.1
overfits): resumed to 4,540 steps it scored 39.11 / 39.60 on test2016 at step 3,900, its best on val.
Since training splits each batch over the cores (train.cpu_data_parallel), the same budget holds more
steps: 60 × 0.922 s / 1.4 s = 39.5 min gave 2,700 steps (0.85 s/step at 2,300, then resumed), and a second
seed (train.seed=1) scored val 39.28 and test2016 39.37 cased / 39.76 lowercased; its 2,300-step average,
this config's earlier train.steps, had scored val 38.72 and test2016 37.58 / 37.99.
On an accelerator, raise data.tokens_per_batch and the steps.

The raw-text goal's own metric (Moses-tokenized lowercased BLEU against the official tokenized references,
docs/bleu.md) can score every validation and choose the best step, with the files source:
    --config.train.valid_tok_refs=../shared/data/multi30k/tok/val.lc.norm.tok.de
    --config.train.best_metric=bleu_moses_lc
then `jaxformer evaluate --workdir RUN --split valid --sweep ... --tok-refs
../shared/data/multi30k/tok/val.lc.norm.tok.de` chooses the window and length penalty by it, and
`--split test --tok-refs .../test2016.lc.norm.tok.de` scores test once.
"""

from jaxformer.config import default_config

LOCAL = "../shared/data/multi30k"


def get_config():
    c = default_config()
    c.model.d_model = 256
    c.model.d_ff = 1024
    c.model.num_heads = 4
    c.model.num_encoder_layers = 3
    c.model.num_decoder_layers = 3
    c.model.dropout_rate = 0.1       # 0.2 scored 2.1 BLEU lower on val at this budget
    c.model.max_len = 128

    c.data.source = "hub"
    c.data.hub_name = "bentrevett/multi30k"
    c.data.hub_config = ""
    c.data.hub_field = ""  # the languages are top-level fields
    c.data.train_split, c.data.valid_split, c.data.test_split = "train", "validation", "test"
    c.data.src_lang, c.data.tgt_lang = "en", "de"
    c.data.train_files = f"{LOCAL}/train"
    c.data.valid_files = f"{LOCAL}/val"
    c.data.test_files = f"{LOCAL}/test2016"
    c.data.vocab_size = 8000
    c.data.tokens_per_batch = 2048   # 4,096: the same val score took ~10% longer (benchmarks/README.md)
    c.data.bucket_lengths = (16, 24, 32, 48, 64)
    c.data.max_len = 64

    c.train.workdir = "runs/multi30k"
    c.train.steps = 2700             # the 60-minute budget on 2 CPU cores, data parallel (~0.85 s/step, ~14 epochs)
    c.train.warmup_steps = 400
    c.train.lr_scale = 0.8           # peak 2.5e-3 at step 400 (see above: 0.6 / 500 is not ruled out)
    c.train.log_every = 50
    c.train.eval_every = 500
    c.train.eval_bleu_sentences = -1  # all 1,014 val pairs: ~15-25 s at beam 4, 7 validations ~6-8% of the run
    c.train.checkpoint_every_steps = 100
    c.train.keep_checkpoints = 5
    c.train.average_last = 5         # chosen on val among the last 1, 3, 5, 8
    c.decode.length_penalty = 1.0    # alpha, chosen on val: 1.0 over 1.4 here; 1.4 over 0.6, 1.0, 2.0 before
    return c
