"""The text sources (jaxformer.data.sources): aligned files, TSV / JSONL / Parquet, the hub, shards, bad files."""

from __future__ import annotations

import collections
import json

import pytest

from jaxformer.data import DataError, load_split, read_pairs
from helpers import data_config as config, m30k, write_pair

pytestmark = pytest.mark.usefixtures("token_cache_dir")  # conftest's: one token cache folder for the data tests


def test_aligned_files_stream_the_raw_lines(multi30k_dir):
    cfg = m30k(multi30k_dir)
    pairs = [(ex["src"], ex["tgt"]) for ex in load_split(cfg.data, "valid", process_index=0, process_count=1)]
    en = (multi30k_dir / "val.en").read_text(encoding="utf-8").split("\n")[:-1]
    de = (multi30k_dir / "val.de").read_text(encoding="utf-8").split("\n")[:-1]
    assert pairs == list(zip(en, de)) and len(pairs) == 1014
    assert read_pairs(cfg.data, "valid", limit=5) == [(e.strip(), d.strip()) for e, d in zip(en[:5], de[:5])]
    cfg.data.src_lang, cfg.data.tgt_lang = "de", "en"  # the other direction is the same files
    first = next(iter(load_split(cfg.data, "valid", process_index=0, process_count=1)))
    assert first == {"src": de[0], "tgt": en[0]}


def test_tsv_jsonl_parquet_give_the_same_pairs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pairs = [("a \"quoted\" cat", "eine Katze"), ("two, dogs", "zwei\tHunde"), ("NA", "null")]
    (tmp_path / "d.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    (tmp_path / "flat.jsonl").write_text("".join(json.dumps({"en": s, "de": t, "id": i}) + "\n"
                                                 for i, (s, t) in enumerate(pairs)), encoding="utf-8")
    (tmp_path / "wmt.jsonl").write_text("".join(json.dumps({"translation": {"de": t, "en": s}}) + "\n"
                                                for s, t in pairs), encoding="utf-8")
    pq.write_table(pa.table({"en": [s for s, _ in pairs], "de": [t for _, t in pairs]}), tmp_path / "d.parquet")
    for name in ("d.tsv", "flat.jsonl", "wmt.jsonl", "d.parquet"):
        cfg = config(train_files=str(tmp_path / name))
        got = [(ex["src"], ex["tgt"]) for ex in load_split(cfg.data, "train", process_index=0, process_count=1)]
        assert got == pairs, name


def test_hub_source_is_the_same_code_with_another_argument(tmp_path, monkeypatch):
    import datasets

    path = tmp_path / "wmt.jsonl"
    path.write_text("".join(json.dumps({"translation": {"de": f"Satz {i}", "en": f"sentence {i}"}}) + "\n"
                            for i in range(6)), encoding="utf-8")
    calls = []
    real = datasets.load_dataset

    def fake_hub(name, config=None, **kw):  # what the hub would stream, from a local file
        calls.append((name, config, kw))
        if name == "wmt14":
            return real("json", data_files={"train": str(path)}, split="train", streaming=True)
        return real(name, config, **kw)

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    cfg = config(source="hub", hub_name="wmt14", hub_config="de-en")
    ds = load_split(cfg.data, "valid", process_index=1, process_count=2)
    assert calls[0] == ("wmt14", "de-en", {"split": "validation", "streaming": True})
    assert [ex["src"] for ex in ds] == ["sentence 1", "sentence 3", "sentence 5"]


def test_two_processes_get_disjoint_shards_covering_the_data(tmp_path, multi30k_dir):
    prefix = write_pair(tmp_path, [f"s{i}" for i in range(101)], [f"t{i}" for i in range(101)])
    cfg = config(train_files=prefix)
    shards = [[ex["src"] for ex in load_split(cfg.data, "train", process_index=r, process_count=2)] for r in (0, 1)]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(f"s{i}" for i in range(101))
    assert abs(len(shards[0]) - len(shards[1])) <= 1
    # on the real data: the two shards' pairs add up to the whole split, as multisets
    cfg = m30k(multi30k_dir)
    whole = collections.Counter((ex["src"], ex["tgt"]) for ex in load_split(cfg.data, "valid", process_index=0,
                                                                             process_count=1))
    parts = [collections.Counter((ex["src"], ex["tgt"]) for ex in load_split(cfg.data, "valid", process_index=r,
                                                                              process_count=2)) for r in (0, 1)]
    assert parts[0] + parts[1] == whole and sum(parts[0].values()) == 507


def test_parallel_files_of_different_lengths(tmp_path):
    prefix = write_pair(tmp_path, ["a", "b", "c"], ["x", "y"])
    with pytest.raises(DataError, match=r"corpus\.en has 3 lines.*corpus\.de has 2 lines"):
        load_split(config(train_files=prefix).data, "train", process_index=0, process_count=1)


def test_missing_files(tmp_path):
    prefix = write_pair(tmp_path, ["a"], ["x"])
    (tmp_path / "corpus.de").unlink()
    with pytest.raises(DataError, match=r"missing file .*corpus\.de"):
        load_split(config(train_files=prefix).data, "train", process_index=0, process_count=1)
    with pytest.raises(DataError, match=r"missing file.*nowhere\.tsv"):
        load_split(config(train_files=str(tmp_path / "nowhere.tsv")).data, "train", process_index=0, process_count=1)
    with pytest.raises(DataError, match="data.valid_files is empty"):
        load_split(config().data, "valid", process_index=0, process_count=1)


def test_dataset_without_the_expected_fields(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"english": "a", "german": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.jsonl.*'translation'.*fields \['english', 'german'\]"):
        load_split(config(train_files=str(tmp_path / "a.jsonl")).data, "train", process_index=0, process_count=1)
    (tmp_path / "b.jsonl").write_text('{"translation": {"fr": "a", "de": "b"}}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"b\.jsonl.*'translation' has languages \['de', 'fr'\].*\['en'\]"):
        load_split(config(train_files=str(tmp_path / "b.jsonl")).data, "train", process_index=0, process_count=1)
