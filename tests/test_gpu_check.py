"""The GPU check, on the CPU: its dry run, the attention choice it measures, and the all-PAD-row guard."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402
from common import transformer_train_flops  # noqa: E402
from jaxformer import parallel  # noqa: E402
from jaxformer.config import default_config  # noqa: E402
from jaxformer.data import BOS_ID, EOS_ID, PAD_ID  # noqa: E402
from jaxformer.attention import choose_attention_impl, key_value_lengths  # noqa: E402
from jaxformer.model import Transformer, TransformerConfig, init_params  # noqa: E402
from jaxformer.steps import Steps, summarize  # noqa: E402

TINY = dict(vocab_size=40, d_model=32, d_ff=64, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
            dropout_rate=0.0, max_len=32)


def test_dry_run_writes_every_part(tmp_path, multi30k_dir):
    """`gpu_check.py --dry-run` runs every part on the CPU, passes its checks and writes the three result files."""
    data = tmp_path / "data"
    data.mkdir()
    for name, lines in (("train", 2000), ("val", 200), ("test2016", 200)):
        for lang in ("en", "de"):
            with open(multi30k_dir / f"{name}.{lang}", encoding="utf-8") as f:
                (data / f"{name}.{lang}").write_text("".join(f.readline() for _ in range(lines)), encoding="utf-8")
    out = tmp_path / "out"
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as the check's own processes choose (its dry run sets quick-compile flags itself)
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out),
                           "--data", str(data), "--work", str(tmp_path / "work")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    summaries = {r["part"]: r for r in rows if r["what"] == "summary"}
    assert list(summaries) == list(gpu_check.PARTS)
    for part, summary in summaries.items():
        assert summary["status"] == "ok" and summary["errors"] == 0 and summary["failed_checks"] == 0, summary
        assert any(r["part"] == part and r["what"] != "summary" for r in rows), part
    checks = [r for r in rows if "pass" in r]
    assert {r["what"] for r in checks} >= {"logits vs CPU float32", "eval loss with all-PAD rows",
                                           "train step with all-PAD rows", "train loss falls",
                                           "train loss as on the CPU", "beam search vs CPU"}
    speed = [r for r in rows if r["part"] == "speed" and r["what"] == "train step"]
    assert {r["pack"] for r in speed} == {True, False} and all(0 < r["mfu"] <= r["mfu_slots"] for r in speed)
    assert all(any(f": {r['resolved']} implementation" in line for line in r["attention_log"])
               for r in speed if r["impl"] == "auto")
    tables = (out / "table.txt").read_text()
    assert all(f"## {part}" in tables for part in gpu_check.PARTS) and "train FLOPs = 3 x forward" in tables
    assert "===== correctness" in (out / "log.txt").read_text()


@pytest.mark.parametrize("dtype, head, structured, needs_weights, d_v, expected", [
    (jnp.bfloat16, 64, True, False, None, "cudnn"),     # the paper's base and big heads, right padding / causal
    (jnp.float16, 128, True, False, None, "cudnn"),
    (jnp.float32, 64, True, False, None, "xla"),        # cuDNN's fused attention is half precision only
    (jnp.bfloat16, 64, False, False, None, "xla"),      # packed rows: a segment mask, no lengths
    (jnp.bfloat16, 100, True, False, None, "xla"),      # not a multiple of 8
    (jnp.bfloat16, 256, True, False, None, "xla"),      # above 128
    (jnp.bfloat16, 64, True, True, None, "einsum"),     # attention dropout / recorded weights need the weights
    (jnp.bfloat16, 64, True, False, 32, "einsum"),      # d_k != d_v
])
def test_auto_attention_choice_on_cuda(dtype, head, structured, needs_weights, d_v, expected):
    impl, why = choose_attention_impl("auto", platform="cuda", dtype=dtype, head_dim_k=head,
                                      head_dim_v=head if d_v is None else d_v, structured_mask=structured,
                                      needs_weights=needs_weights)
    assert impl == expected and why


def test_attention_choice_off_cuda_and_when_requested():
    kw = dict(dtype=jnp.bfloat16, head_dim_k=64, head_dim_v=64)
    assert choose_attention_impl("auto", platform="rocm", **kw)[0] == "xla"
    assert choose_attention_impl("auto", platform="cpu", **kw)[0] == "xla"
    assert choose_attention_impl("cudnn", platform="cuda", structured_mask=False, **kw)[0] == "cudnn"  # as asked
    assert choose_attention_impl("xla", platform="cuda", **kw)[0] == "xla"
    with pytest.raises(ValueError, match="model.attention_impl"):
        choose_attention_impl("flash", platform="cuda", **kw)


def test_key_value_lengths_never_zero():
    valid = jnp.array([[True, True, False], [False, False, False], [True, True, True]])
    lengths = key_value_lengths(valid)
    assert lengths.dtype == jnp.int32 and lengths.tolist() == [2, 1, 3]


def _batch_with_pad_rows(packed: bool) -> dict[str, np.ndarray]:
    """4 rows of length 8, the last two all PAD; packed: two pairs in row 0."""
    src = np.zeros((4, 8), np.int32)
    tgt_in, tgt_out = np.zeros_like(src), np.zeros_like(src)
    src[0, :4], tgt_in[0, :4], tgt_out[0, :4] = [5, 6, 7, EOS_ID], [BOS_ID, 8, 9, 10], [8, 9, 10, EOS_ID]
    src[1, :3], tgt_in[1, :2], tgt_out[1, :2] = [11, 12, EOS_ID], [BOS_ID, 13], [13, EOS_ID]
    batch = {"src": src, "tgt_in": tgt_in, "tgt_out": tgt_out}
    if packed:
        src[0, 4:6], tgt_in[0, 4:6], tgt_out[0, 4:6] = [14, EOS_ID], [BOS_ID, 15], [15, EOS_ID]
        rows = lambda *two: np.array(list(two) + [[0] * 8] * 2, np.int32)  # noqa: E731  + 2 all-PAD rows
        batch.update(src_segments=rows([1, 1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]),
                     tgt_segments=rows([1, 1, 1, 1, 2, 2, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]),
                     src_positions=rows([0, 1, 2, 3, 0, 1, 0, 0], [0, 1, 2, 0, 0, 0, 0, 0]),
                     tgt_positions=rows([0, 1, 2, 3, 0, 1, 0, 0], [0, 1, 0, 0, 0, 0, 0, 0]))
    return batch


def test_the_model_never_gives_cudnn_a_zero_length(monkeypatch):
    """With cuDNN's implementation, an all-PAD row's key/value length is clamped to 1 (0 gives NaN rows under
    cuDNN); the call is recorded and run by XLA instead, since this machine has no GPU."""
    original = jax.nn.dot_product_attention
    seen = []

    def recording(query, key, value, *args, implementation=None, key_value_seq_lengths=None, **kwargs):
        if implementation == "cudnn" and key_value_seq_lengths is not None:
            seen.append(np.asarray(key_value_seq_lengths))
        return original(query, key, value, *args, implementation="xla", key_value_seq_lengths=key_value_seq_lengths,
                        **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
    cfg = TransformerConfig(**TINY, dtype="bfloat16", attention_impl="cudnn")
    batch = _batch_with_pad_rows(packed=False)
    params = init_params(cfg, jax.random.key(0))
    seen.clear()  # the calls of initialisation's dummy batch
    logits = Transformer(cfg).apply(params, batch["src"], batch["tgt_in"])
    assert len(seen) == 2  # the encoder's self-attention and the decoder's cross-attention
    assert all(lengths.tolist() == [4, 3, 1, 1] for lengths in seen)
    assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("impl", ["xla", "einsum"])
def test_eval_batch_with_all_pad_rows_gives_a_finite_loss(impl, packed):
    cfg = TransformerConfig(**TINY, attention_impl=impl)
    mesh = parallel.make_mesh(jax.devices()[:1])
    steps = Steps.from_config(Transformer(cfg), default_config().train, mesh)
    batch = _batch_with_pad_rows(packed)
    sums = summarize(steps.evaluate(steps.init_state(0).params, [parallel.shard_batch(batch, mesh)]))
    assert np.isfinite(sums["loss"]) and sums["tokens"] == int((batch["tgt_out"] != PAD_ID).sum())


def test_pair_lengths_and_flops_of_packed_and_padded_batches():
    """The check's MFU counts the batch's real pairs: a packed row's pairs apart, padding and PAD rows not."""
    unpacked, packed = _batch_with_pad_rows(False), _batch_with_pad_rows(True)
    assert [a.tolist() for a in gpu_check.pair_lengths(unpacked)] == [[4, 3], [4, 2]]
    assert [a.tolist() for a in gpu_check.pair_lengths(packed)] == [[4, 2, 3], [4, 2, 2]]
    cfg = TransformerConfig(**TINY)
    expected = sum(transformer_train_flops(cfg, 1, s, t) for s, t in ((4, 4), (2, 2), (3, 2)))
    assert gpu_check.useful_train_flops(cfg, [packed]) == pytest.approx(expected)
    full = {"src": np.full((2, 5), 7, np.int32), "tgt_out": np.full((2, 6), 7, np.int32)}
    assert gpu_check.useful_train_flops(cfg, [full]) == pytest.approx(transformer_train_flops(cfg, 2, 5, 6))


def test_batches_without_datasets_are_the_library_batches(tmp_path, multi30k_dir, multi30k_tokenizer, monkeypatch):
    """Where `datasets` does not import (the GPU image lacks it unless its wheel came along), the check reads
    the files itself into the same BatchIterator: the same batches."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train", "test2016"):
        for lang in ("en", "de"):
            with open(multi30k_dir / f"train.{lang}", encoding="utf-8") as f:
                (data / f"{name}.{lang}").write_text("".join(f.readline() for _ in range(300)), encoding="utf-8")
    ctx = gpu_check.Context(str(data), str(tmp_path / "work"), True, 0.0, gpu_check.AttentionLog())
    config = ctx.multi30k_config(vocab=False)
    batches = {}
    for name in ("library", "direct"):
        if name == "direct":
            monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
        for pack in (True, False):
            config.data.pack = pack
            batches[name, pack] = list(gpu_check.batch_iterator(config, multi30k_tokenizer, "train", repeat=False,
                                                                shuffle=True))
    for pack in (True, False):
        library, direct = batches["library", pack], batches["direct", pack]
        assert len(library) == len(direct) > 1
        for a, b in zip(library, direct):
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
