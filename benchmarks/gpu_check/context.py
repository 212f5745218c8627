"""What every part shares: its folders, mode and deadline (`Context`), the attention choices jaxformer logs,
the recipes pointed at the brought data, and the small helpers the parts' checks have in common."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import traceback

BENCHMARKS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(BENCHMARKS)
ENTRY = os.path.join(BENCHMARKS, "gpu_check.py")  # the command every part's process runs (`--part NAME`)
DRY_RUN_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
GIB = float(1 << 30)


class AttentionLog(logging.Handler):
    """Collects the attention choices jaxformer logs ("attention <where>: <impl> implementation (<why>)")."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("attention "):
            self.lines.append(message)

    def since(self, mark: int, choice: tuple[str, str]) -> list[str]:
        """The lines logged after `mark`; else, as jaxformer logs a choice once per process, the earlier lines
        of the same `choice` (implementation, reason)."""
        return self.lines[mark:] or [f"{line} [logged earlier]" for line in self.lines[:mark]
                                     if line.endswith(f": {choice[0]} implementation ({choice[1]})")]


@dataclasses.dataclass
class Context:
    """What every part of one invocation shares: its folders, its mode and its deadline."""

    data: str
    work: str
    dry: bool
    deadline: float
    attention_log: AttentionLog

    def left(self) -> float:
        return self.deadline - time.monotonic()

    @property
    def vocab_path(self) -> str:
        return os.path.join(self.work, "vocab.model")

    def data_file(self, split: str, lang: str) -> str:
        name = {"train": "train", "valid": "val", "test": "test2016"}[split]
        path = os.path.join(self.data, f"{name}.{lang}")
        if split == "valid" and not os.path.isfile(path):
            return self.data_file("test", lang)
        return path

    def with_files(self, c, *, vocab: bool = True):
        """Point config `c` at the brought data, this run's vocabulary and token-cache folder."""
        c.data.source = "files"
        for split, key in (("train", "train_files"), ("valid", "valid_files"), ("test", "test_files")):
            c.data[key] = self.data_file(split, "en")[:-3]
        c.data.cache_dir = os.path.join(self.work, "data_cache")
        if vocab:
            c.data.vocab_model = self.vocab_path
        if self.dry:
            c.data.vocab_size = 300
            c.data.vocab_sample_size = 4000
        return c

    def multi30k_config(self, *, vocab: bool = True):
        c = self.with_files(load_config("multi30k"), vocab=vocab)
        if self.dry:
            c.model.update(d_model=32, d_ff=64, num_heads=2, num_encoder_layers=1, num_decoder_layers=1)
            c.data.tokens_per_batch = 512
        return c


def load_config(name: str):
    """configs/<name>.py's get_config()."""
    from jaxformer.config import load_recipe

    return load_recipe(os.path.join(REPO, "configs", f"{name}.py"))


def guarded(what: str, fn, *args, **kwargs):
    """The rows of generator `fn`, or, when it raises, one row naming the error; the part goes on."""
    try:
        yield from fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - one failed check must not hide the others
        traceback.print_exc()
        yield {"what": what, "error": f"{type(e).__name__}: {str(e)[:500]}"}


def applicable_impls(platform: str) -> list[str]:
    """The attention implementations that run on `platform` ("cudnn" only on a CUDA GPU)."""
    return ["cudnn", "xla"] if platform == "cuda" else ["xla"]


def load_tokenizer(ctx: Context):
    from jaxformer.data import Tokenizer

    return Tokenizer.load(ctx.vocab_path)


def one_device_mesh():
    import jax

    from jaxformer import parallel

    return parallel.make_mesh(jax.devices()[:1])


def rms(x) -> float:
    import numpy as np

    x = np.asarray(x, np.float64)
    return float(np.sqrt(np.mean(np.square(x)))) if x.size else 0.0


def is_out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
