"""English constituency parsing (§6.3) on the free Penn Treebank sample, sized for 2 CPU cores and 2 hours.

    python train.py --config configs/ptb_parse.py
    jaxformer parse --model runs/ptb_parse --input sentences.txt --draw

The sample (../shared/data/ptb_sample, 3,669 WSJ sentences) split by file: train wsj_0001-0139 (3,068
sentences), dev 0140-0159 (328, the validation split), test 0160-0179 (273). The source is the words, one
vocabulary entry each (data.vocab_kind="words"); the target is the tree linearized as Vinyals et al. (2015)
and the paper do, `(S (NP DT NN ) (VP VBD ) . )`, each symbol one entry. Every search keeps to the grammar
mask (jaxformer.grammar), so each output is one well-formed tree with a tag per word.

Beside each value, the paper's (trained on the WSJ's 40K sentences; "dropout (both attention and residual),
learning rates and beam size on the Section 22 development set, all other parameters remained unchanged
from the English-to-German base translation model"). The paper's setting itself: configs/wsj_parse.py.
Sized on 2 CPU cores shared with other jobs (load ~5): about 1.9 s per step at these sizes (~1,050 target
tokens/s, measured over 20 steps), so 3,600 steps of 2,048 target slots fill about 2 hours (~95 steps per
epoch, ~38 epochs); on idle cores the same steps take less. 4,096 slots took 4.3 s per step.
"""

from jaxformer.config import default_config

SAMPLE = "../shared/data/ptb_sample"


def get_config():
    c = default_config()
    c.model.num_encoder_layers = 4   # paper: 4
    c.model.num_decoder_layers = 4   # paper: 4
    c.model.d_model = 256            # paper: 1024
    c.model.d_ff = 1024              # paper: 2048 (the base model's, unchanged)
    c.model.num_heads = 4            # paper: 8 (the base model's)
    c.model.dropout_rate = 0.3       # paper: chosen on dev; 3K sentences overfit fast
    c.model.attention_dropout_rate = 0.0  # paper: chosen on dev; 0 keeps the fast attention on a CPU
    c.model.max_len = 576            # input (up to data.max_len) + max_extra_len (sinusoids cost nothing)

    c.data.source = "treebank"
    c.data.treebank_dir = SAMPLE
    c.data.treebank_splits = "sample"  # files 1-139 / 140-159 / 160-179
    c.data.src_lang, c.data.tgt_lang = "en", "tree"
    c.data.vocab_kind = "words"      # paper: a 16K-token vocabulary on the WSJ
    c.data.min_count = 2             # words seen once in training are UNK, so UNK is learned
    c.data.max_len = 256             # tree symbols with EOS; longer pairs (under 1% of train) are counted skips
    c.data.bucket_lengths = (256,)
    c.data.tokens_per_batch = 2048   # paper: ~25,000 tokens per batch (on 8 GPUs)

    c.train.workdir = "runs/ptb_parse"
    c.train.steps = 3600             # about 2 hours on 2 CPU cores (see above); paper: not given
    c.train.warmup_steps = 800       # paper: 4000 (base), rates chosen on dev
    c.train.lr_scale = 1.0           # peak 256^-0.5 * 800^-0.5 = 2.2e-3
    c.train.log_every = 100
    c.train.eval_every = 400
    c.train.eval_bleu_sentences = 100  # each validation parses the first 100 of the 328 dev sentences, greedily
    #                                    (parseval F1; at most ~1.5 minutes even where an early model runs to the
    #                                    limit; all 328 (-1) could take ~5, far over 10% of the run at 10 validations)
    c.train.best_metric = "f1"       # paper: settings chosen by dev F1
    c.train.keep_best = 3
    c.train.checkpoint_every_steps = 200
    c.train.keep_checkpoints = 5
    c.train.average_last = 5         # paper: not said for parsing (base translation: the last 5)

    c.decode.beam_size = 21          # paper: 21
    c.decode.length_penalty = 0.3    # paper: alpha 0.3
    c.decode.max_extra_len = 300     # paper: max output length = input length + 300
    c.decode.batch_size = 32
    return c
