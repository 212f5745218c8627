"""The paper's big model on WMT14 English->German (Table 3, "big"): 28.4 BLEU on newstest2014.

    python train.py --config configs/wmt14_big.py --workdir runs/wmt14_big

As configs/wmt14_base.py, with N=6, d_model 1024, d_ff 4096, h 16, P_drop 0.3 (the paper's En-De big
model; its En-Fr one used 0.1), 300,000 steps, and the average of the last 20 checkpoints (Section 6.1).
"""

import pathlib

from jaxformer.config import load_recipe


def get_config():
    c = load_recipe(pathlib.Path(__file__).with_name("wmt14_base.py"))
    c.model.d_model = 1024
    c.model.d_ff = 4096
    c.model.num_heads = 16
    c.model.dropout_rate = 0.3

    c.train.workdir = "runs/wmt14_big"
    c.train.steps = 300_000
    c.train.keep_checkpoints = 20
    c.train.average_last = 20
    return c
