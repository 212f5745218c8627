"""The GPU path checked and measured by one command: environment, correctness, speed, memory, decode.

    bash benchmarks/gpu_check.sh RESULTS_DIR     # on the GPU machine: the brought wheels and data (docs/gpu_check.md)
    python benchmarks/gpu_check.py --out RESULTS_DIR [--data DIR] [--parts speed,memory] [--budget-s 470]
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check   # every part on the CPU with tiny shapes

Parts, each in its own process under its own time limit (a slow or hung part loses only its own rows; the
parent stops a part's whole process group at its limit), each in a module of this package:
  data         part_data.py: the shared vocabulary, trained on the brought Multi30k pairs (on the CPU)
  env          part_env.py: device, jax / jaxlib / cuDNN versions, the measured bf16 (and float32) matmul peak
  correctness  part_correctness.py: bf16 logits against the CPU's float32 ones and beam search against the CPU
               (versus_cpu.py); finite losses on evaluation batches with all-PAD rows for every attention
               implementation (all_pad.py); 200 steps of configs/multi30k.py (`jaxformer.train.run`, set up in
               multi30k_run.py) beside the same run on the host's CPU
  speed        part_speed.py: non-pad target tokens/s and MFU of the base and big train steps (bf16, 25k-token
               batches of the WMT14 configs) per attention implementation, packing on and off (step_timing.py)
  memory       part_memory.py: peak device memory of the base and big steps, and the largest big batch that fits
  decode       part_decode.py: beam-4 sentences/s on test2016 for the Multi30k model trained by `correctness`
harness.py holds the arguments, the part registry and the results; context.py what the parts share;
batches.py the library's batches, with or without `datasets`.
Every figure is a JSON row: printed, and in <out>/results.jsonl; <out>/table.txt holds one table per part and
<out>/log.txt the parts' logs (with the attention choices `model.attention_impl="auto"` logged). A part's
rows are written as they come, so a part stopped at its limit keeps what it measured. Exit status 0 when
every part finished without an error and every check passed.

The sentences of the speed and memory batches are the brought Multi30k ones (about 15 tokens a side,
half a WMT14 sentence), batched as the WMT14 configs batch them.
"""

from __future__ import annotations

import os
import sys

_BENCHMARKS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# benchmarks/common.py, and this checkout's jaxformer before any installed one
sys.path[:0] = [_BENCHMARKS, os.path.dirname(_BENCHMARKS)]

from .batches import batch_iterator  # noqa: E402
from .context import AttentionLog, Context  # noqa: E402
from .harness import PARTS, main  # noqa: E402
from .step_timing import pair_lengths, useful_train_flops  # noqa: E402

__all__ = ["PARTS", "AttentionLog", "Context", "batch_iterator", "main", "pair_lengths", "useful_train_flops"]
