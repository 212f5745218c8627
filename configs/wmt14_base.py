"""The paper's base model on WMT14 English->German (Table 3, "base"; Section 5).

    python train.py --config configs/wmt14_base.py --workdir runs/wmt14_base

Data: the hub's `wmt14` de-en (4.5M pairs) with a shared 37,000-piece BPE vocabulary; validation on
newstest2013, test on newstest2014. Batches of ~25,000 source and ~25,000 target tokens per update
(Section 5.1): with fewer or smaller accelerators than the paper's 8 P100s, lower data.tokens_per_batch
and raise train.grad_accum_steps so that their product stays about 25,000
(e.g. --config.data.tokens_per_batch=6250 --config.train.grad_accum_steps=4).
Optimizer and schedule (Section 5.3): Adam β1 0.9, β2 0.98, ε 1e-9, warmup 4,000 steps, 100,000 steps.
Regularization (5.4): P_drop 0.1, label smoothing 0.1. The final model averages the last 5 checkpoints,
written every 10 minutes (Section 6.1); beam 4, length penalty α 0.6, max output = input + 50.
bfloat16 compute (float32 master weights) roughly halves step time on recent GPUs and TPUs:
--config.model.dtype=bfloat16 (not in the paper, which trained in float32).
"""

from jaxformer.config import default_config


def get_config():
    c = default_config()  # the model section's defaults are the base model: N=6, d_model 512, d_ff 2048, h 8

    c.data.source = "hub"
    c.data.hub_name = "wmt14"
    c.data.hub_config = "de-en"
    c.data.hub_field = "translation"
    c.data.src_lang = "en"
    c.data.tgt_lang = "de"
    c.data.vocab_size = 37_000
    c.data.tokens_per_batch = 25_000
    c.data.max_len = 256

    c.train.workdir = "runs/wmt14_base"
    c.train.steps = 100_000
    c.train.warmup_steps = 4000
    c.train.log_every = 100
    c.train.eval_every = 5000
    c.train.eval_bleu_sentences = -1  # all of newstest2013 (3,000 pairs) every 5,000 steps
    c.train.checkpoint_every_minutes = 10.0
    c.train.checkpoint_every_steps = 0
    c.train.keep_checkpoints = 5
    c.train.average_last = 5

    c.decode.beam_size = 4
    c.decode.length_penalty = 0.6
    c.decode.max_extra_len = 50
    return c
