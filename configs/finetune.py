"""Fine-tuning a pretrained model on parallel text files: Multi30k English->German as the example.

    jaxformer import-marian Helsinki-NLP/opus-mt-en-de --out models/opus-mt-en-de   # online; offline: a local dir
    python train.py --config configs/finetune.py --config.train.init_from=models/opus-mt-en-de \\
        --config.train.workdir=runs/finetune-en-de

`train.init_from` names a jaxformer export directory (an imported Marian model, or any `jaxformer export`):
the run starts from its parameters, keeps its architecture and vocabulary (a `model.*` key set here to
something else than jaxformer's default and the model's value is an error naming it; `data.vocab_model`
must stay empty), and starts a fresh Adam state and schedule. The rate is the paper's formula with a short
warmup and a small scale: peak lr_scale * d_model^-0.5 * warmup^-0.5, 3.1e-5 for opus-mt's d_model 512 at
step 200 (the usual fine-tuning rates are 1e-5 to 1e-4), then decaying as step^-0.5. Dropout is the
config's (0.1, opus-mt's own). Other data: set data.train_files / valid_files / test_files to a pair of
aligned text files (PREFIX.en / PREFIX.de), or one .tsv/.jsonl/.parquet file each, and data.src_lang /
data.tgt_lang.

No pretrained weights can be downloaded on this project's machines, so the figures for this recipe in
README come from a random or self-trained starting point, not from opus-mt.
"""

from jaxformer.config import default_config

LOCAL = "../shared/data/multi30k"


def get_config():
    c = default_config()
    c.train.init_from = ""           # required: the export directory to start from

    c.model.dropout_rate = 0.1       # the rest of model.* comes from train.init_from

    c.data.source = "files"
    c.data.src_lang, c.data.tgt_lang = "en", "de"
    c.data.train_files = f"{LOCAL}/train"
    c.data.valid_files = f"{LOCAL}/val"
    c.data.test_files = f"{LOCAL}/test2016"
    c.data.tokens_per_batch = 2048
    c.data.bucket_lengths = (16, 24, 32, 48, 64)
    c.data.max_len = 64

    c.train.workdir = "runs/finetune"
    c.train.steps = 1000
    c.train.warmup_steps = 200
    c.train.lr_scale = 0.01          # peak 3.1e-5 at d_model 512 (4.4e-5 at d_model 256)
    c.train.label_smoothing = 0.1
    c.train.log_every = 25
    c.train.eval_every = 500          # every 250 steps, all of val would take over 10% of the run on 2 CPU cores
    c.train.eval_bleu_sentences = -1  # all 1,014 val pairs
    c.train.checkpoint_every_steps = 250
    c.train.keep_checkpoints = 4
    c.train.average_last = 1         # fine-tuning: the last checkpoint
    c.decode.beam_size = 4
    c.decode.length_penalty = 1.0
    return c
