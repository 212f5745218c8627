"""Where pairs come from: a streaming Hugging Face `datasets.IterableDataset` of `{'src', 'tgt'}`.

A hub dataset, local files (aligned `<prefix>.<lang>` text, .tsv, .jsonl/.json, .parquet), the generated
offline task or a Penn Treebank's linearized trees (parsing), all through the same `datasets` API and the
same mapping; one process reads its own shard
(`split_dataset_by_node`). Strings stay raw here: cleaning is counted where pairs are tokenized.
`describe_source` is what the token cache's key says about the source, so an edited file is never
served from a stale cache.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

from jaxformer.data.common import DataError, clean, process_info

log = logging.getLogger(__name__)

_SPLITS = {  # split -> (config key of the hub split name, config key of the local files)
    "train": ("train_split", "train_files"),
    "valid": ("valid_split", "valid_files"),
    "test": ("test_split", "test_files"),
}


def _split_keys(split: str) -> tuple[str, str]:
    if split not in _SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {sorted(_SPLITS)}")
    return _SPLITS[split]


def load_split(data_cfg, split: str, *, process_index=None, process_count=None):
    """Streaming `datasets.IterableDataset` of `{'src': str, 'tgt': str}` for this process.

    `split` is 'train', 'valid' or 'test'; `data_cfg` is `config.data`. The process's shard
    comes from `datasets.distributed.split_dataset_by_node` (defaults: jax's process index
    and count). Strings are raw: filtering happens in `BatchIterator`, where it is counted.
    """
    from datasets.distributed import split_dataset_by_node

    process_index, process_count = process_info(process_index, process_count)
    ds = _load_unsharded(data_cfg, split)
    if process_count > 1:
        ds = split_dataset_by_node(ds, rank=process_index, world_size=process_count)
    return ds


def _load_unsharded(data_cfg, split: str):
    split_key, files_key = _split_keys(split)
    source = data_cfg.source
    if source == "hub":
        import datasets

        name, config, hub_split = data_cfg.hub_name, data_cfg.hub_config or None, data_cfg[split_key]
        if not name:
            raise DataError("data.hub_name is empty; name a Hugging Face dataset (e.g. 'wmt14') with data.source='hub'")
        ds = datasets.load_dataset(name, config, split=hub_split, streaming=True)
        return _to_pairs(ds, data_cfg, f"hub dataset {name!r} (config {config!r}, split {hub_split!r})")
    if source == "files":
        spec = data_cfg[files_key]
        if not spec:
            raise DataError(f"data.{files_key} is empty; set it to a prefix of aligned files (<prefix>."
                            f"{data_cfg.src_lang}, <prefix>.{data_cfg.tgt_lang}) or a .tsv/.jsonl/.parquet file")
        return _load_files(spec, data_cfg, f"data.{files_key}")
    if source in _WRITTEN:
        return _load_files(_written_prefix(data_cfg, split), data_cfg, _WRITTEN[source])
    raise DataError(f"data.source={source!r} is not one of 'hub', 'files', 'synthetic', 'treebank'")


def _count_lines(path: str) -> int:
    """Lines as the `text` builder splits them (universal newlines), without holding the file."""
    n, last = 0, "\n"
    with open(path, encoding="utf-8", errors="replace") as f:
        while chunk := f.read(1 << 22):
            n += chunk.count("\n")
            last = chunk[-1]
    return n + (last != "\n")


def _text_column(path: str, column: str):
    import datasets

    ds = datasets.load_dataset("text", data_files={"train": path}, split="train", streaming=True,
                               encoding_errors="replace")
    return ds.rename_column("text", column)


def _load_files(spec: str, data_cfg, key: str):
    """Aligned `<spec>.<lang>` text files, or one .tsv / .jsonl / .json / .parquet file."""
    import datasets

    src_lang, tgt_lang = data_cfg.src_lang, data_cfg.tgt_lang
    src_path, tgt_path = f"{spec}.{src_lang}", f"{spec}.{tgt_lang}"
    if os.path.isfile(src_path) or os.path.isfile(tgt_path):
        for path in (src_path, tgt_path):
            if not os.path.isfile(path):
                raise DataError(f"missing file {path} ({key}={spec!r} needs both {src_path} and {tgt_path})")
        n_src, n_tgt = _count_lines(src_path), _count_lines(tgt_path)
        if n_src != n_tgt:
            raise DataError(f"parallel files differ in length: {src_path} has {n_src} lines, "
                            f"{tgt_path} has {n_tgt} lines ({key}={spec!r})")
        if n_src == 0:
            raise DataError(f"parallel files {src_path} and {tgt_path} are empty ({key}={spec!r})")
        # Horizontal concatenation zips the two streams and keeps them aligned (never re-sharded).
        return datasets.concatenate_datasets([_text_column(src_path, "src"), _text_column(tgt_path, "tgt")], axis=1)
    if not os.path.exists(spec):
        raise DataError(f"missing file: neither {spec} nor the aligned pair {src_path} / {tgt_path} exists "
                        f"({key}={spec!r})")
    if os.path.getsize(spec) == 0:
        raise DataError(f"file {spec} is empty ({key})")
    ext = os.path.splitext(spec[:-3] if spec.endswith(".gz") else spec)[1].lower()
    if ext == ".tsv":  # src<TAB>tgt per line, no header; a tab inside the target is kept
        ds = _text_column(spec, "line")

        def split_tab(ex):
            src, tab, tgt = ex["line"].partition("\t")
            return {"src": src, "tgt": tgt} if tab else {"src": "", "tgt": ""}

        return ds.map(split_tab).select_columns(["src", "tgt"])
    if ext in (".jsonl", ".json", ".parquet"):
        builder = "parquet" if ext == ".parquet" else "json"
        # (the json builder only applies encoding_errors when re-encoding from a non-"utf-8" name)
        kwargs = {} if builder == "parquet" else {"encoding": "utf-8-sig", "encoding_errors": "replace"}
        ds = datasets.load_dataset(builder, data_files={"train": spec}, split="train", streaming=True, **kwargs)
        return _to_pairs(ds, data_cfg, f"file {spec}")
    raise DataError(f"{key}={spec!r}: unsupported file type {ext!r}; use aligned <prefix>.{src_lang}/"
                    f"<prefix>.{tgt_lang} files, .tsv, .jsonl/.json or .parquet")


def _to_pairs(ds, data_cfg, origin: str):
    """Map the WMT layout `{field: {lang: text}}` or the flat `{lang: text}` one to `{'src','tgt'}`.

    The layout is read off the first example, so a dataset without the fields fails here,
    with the fields it does have, rather than somewhere inside training.
    """
    src, tgt, field = data_cfg.src_lang, data_cfg.tgt_lang, data_cfg.hub_field
    try:
        first = next(iter(ds), None)
    except Exception as e:  # unreadable file: name it instead of showing a parser traceback
        raise DataError(f"cannot read {origin}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if first is None:
        raise DataError(f"{origin} has no examples")
    if field and isinstance(first.get(field), dict):
        inner = first[field]
        missing = [lang for lang in (src, tgt) if lang not in inner]
        if missing:
            raise DataError(f"{origin}: field {field!r} has languages {sorted(inner)}, not {missing} "
                            f"(data.src_lang={src!r}, data.tgt_lang={tgt!r})")

        def pick(ex):
            pair = ex.get(field) or {}
            return {"src": pair.get(src) or "", "tgt": pair.get(tgt) or ""}
    elif src in first and tgt in first:
        def pick(ex):
            return {"src": ex.get(src) or "", "tgt": ex.get(tgt) or ""}
    else:
        raise DataError(f"{origin}: expected field {field!r} (data.hub_field) holding {{{src!r}, {tgt!r}}} or "
                        f"top-level fields {src!r} and {tgt!r}; the examples have fields {sorted(first)}")
    out = ds.map(pick)
    return out.select_columns(["src", "tgt"])


def ensure_synthetic(data_cfg) -> str:
    """Generate the offline number-words task once (per size and seed); returns its folder."""
    from jaxformer import synthetic

    langs = {data_cfg.src_lang, data_cfg.tgt_lang}
    if langs != {"en", "de"}:
        raise DataError(f"data.source='synthetic' is English<->German; data.src_lang/tgt_lang are "
                        f"{data_cfg.src_lang!r}/{data_cfg.tgt_lang!r}")
    n_train, seed = int(data_cfg.synthetic_size), int(data_cfg.seed)
    n_eval = min(1000, max(100, n_train // 20))
    base = data_cfg.get("synthetic_dir", "") or "runs/synthetic_data"
    directory = os.path.join(base, f"numbers-n{n_train}-s{seed}")
    done = os.path.join(directory, "COMPLETE")
    if not os.path.exists(done):
        log.info("writing the synthetic number-words task to %s", directory)
        synthetic.write_synthetic(directory, n_train, n_eval, n_eval, seed)
        with open(done, "w") as f:
            f.write(f"train={n_train} valid={n_eval} test={n_eval} seed={seed}\n")
    return directory


# Which treebank split each pipeline split reads, and the named split ranges data.treebank_splits chooses from.
_TREEBANK_SPLIT = {"train": "train", "valid": "dev", "test": "test"}


def _treebank_ranges(data_cfg) -> dict:
    from jaxformer.data import treebank

    ranges = {"sample": treebank.SAMPLE_SPLITS, "wsj": treebank.WSJ_SPLITS}
    if data_cfg.treebank_splits not in ranges:
        raise DataError(f"data.treebank_splits={data_cfg.treebank_splits!r}: choose 'sample' (the free sample's "
                        f"files 1-139/140-159/160-179) or 'wsj' (sections 02-21/22/23)")
    return ranges[data_cfg.treebank_splits]


def ensure_treebank(data_cfg) -> str:
    """Linearize a treebank's train/dev/test trees once into aligned text files (`<split>.<src_lang>`: the
    words, `<split>.<tgt_lang>`: the symbols; dev becomes `valid`), then read as files; returns their folder.
    The folder is named by the .mrg files' names, sizes and times, so an edited treebank is written anew."""
    import hashlib
    import json

    from jaxformer.data import treebank

    if not data_cfg.treebank_dir:
        raise DataError("data.treebank_dir is empty; with data.source='treebank' point it at the folder of "
                        "wsj_NNNN.mrg files (e.g. ../shared/data/ptb_sample)")
    if data_cfg.src_lang == data_cfg.tgt_lang:
        raise DataError(f"data.src_lang and data.tgt_lang are both {data_cfg.src_lang!r}: the words and the trees "
                        "need two file suffixes (e.g. en and tree)")
    ranges = _treebank_ranges(data_cfg)
    files = {split: treebank.split_files(data_cfg.treebank_dir, name, ranges)
             for split, name in _TREEBANK_SPLIT.items()}
    stamp = json.dumps({split: [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
                        for split, paths in files.items()}, sort_keys=True)
    name = os.path.basename(os.path.normpath(str(data_cfg.treebank_dir))) or "treebank"
    directory = os.path.join(data_cfg.get("treebank_data_dir", "") or "runs/treebank_data",
                             f"{name}-{data_cfg.treebank_splits}-{hashlib.sha256(stamp.encode()).hexdigest()[:12]}")
    done = os.path.join(directory, "COMPLETE")
    if not os.path.exists(done):
        log.info("linearizing the treebank %s into %s", data_cfg.treebank_dir, directory)
        os.makedirs(directory, exist_ok=True)
        counts = {}
        for split, paths in files.items():
            pairs = [treebank.linearize(tree) for tree in treebank.read_trees(paths)]
            for lang, side in ((data_cfg.src_lang, 0), (data_cfg.tgt_lang, 1)):
                tmp = os.path.join(directory, f"{split}.{lang}.tmp{os.getpid()}")
                with open(tmp, "w", encoding="utf-8") as f:
                    f.writelines(" ".join(pair[side]) + "\n" for pair in pairs)
                os.replace(tmp, os.path.join(directory, f"{split}.{lang}"))
            counts[split] = len(pairs)
        with open(done, "w") as f:
            f.write(json.dumps({"treebank_dir": os.path.abspath(str(data_cfg.treebank_dir)),
                                "splits": data_cfg.treebank_splits, "sentences": counts}) + "\n")
    return directory


# The sources written to aligned text files first: data.source -> the config key named in their errors.
_WRITTEN = {"synthetic": "data.synthetic_dir", "treebank": "data.treebank_dir"}


def _written_prefix(data_cfg, split: str) -> str:
    """`<folder>/<split>` of a source written to aligned files (the offline task, a treebank)."""
    _split_keys(split)
    folder = ensure_synthetic(data_cfg) if data_cfg.source == "synthetic" else ensure_treebank(data_cfg)
    return os.path.join(folder, split)


def read_pairs(data_cfg, split: str, limit: int | None = None) -> list[tuple[str, str]]:
    """All (or the first `limit`) raw (src, tgt) pairs of a split, unsharded: for BLEU.

    Empty and non-UTF-8 pairs are dropped, as in training; no length limit is applied.
    """
    out = []
    for ex in load_split(data_cfg, split, process_index=0, process_count=1):
        if limit is not None and len(out) >= limit:
            break
        src, tgt, reason = clean(ex["src"], ex["tgt"])
        if reason is None:
            out.append((src, tgt))
    return out




def _aligned_paths(data_cfg, split: str) -> list[str] | None:
    """The `<prefix>.<src_lang>`, `<prefix>.<tgt_lang>` files of a split that is read from aligned text files."""
    if data_cfg.source == "hub":
        return None
    spec = _written_prefix(data_cfg, split) if data_cfg.source in _WRITTEN else data_cfg[_split_keys(split)[1]]
    paths = [f"{spec}.{data_cfg.src_lang}", f"{spec}.{data_cfg.tgt_lang}"]
    return paths if spec and all(os.path.isfile(p) for p in paths) else None


def pair_batches(data_cfg, split: str, *, process_index: int, process_count: int,
                 batch_size: int = 2048) -> Iterator[tuple[list[str], list[str]]]:
    """This process's raw (sources, targets) of `split`, `batch_size` pairs at a time: the first pass's input.

    The same pairs as `load_split`, read faster: aligned text files as two `datasets` text streams
    zipped batch by batch (sharded alike), instead of example by example through the zipped dataset.
    """
    from datasets.distributed import split_dataset_by_node

    paths = _aligned_paths(data_cfg, split)
    if paths is None:
        for batch in load_split(data_cfg, split, process_index=process_index,
                                process_count=process_count).iter(batch_size=batch_size):
            yield batch["src"], batch["tgt"]
        return
    streams = []
    for path in paths:
        ds = _text_column(path, "line")
        if process_count > 1:
            ds = split_dataset_by_node(ds, rank=process_index, world_size=process_count)
        streams.append(ds.iter(batch_size=batch_size))
    for src, tgt in zip(*streams, strict=True):
        yield src["line"], tgt["line"]


def describe_source(data_cfg, split: str) -> dict:
    """The source of `split` as JSON: names, and for local files their paths, sizes and modification times."""
    split_key, files_key = _split_keys(split)
    out = {"source": data_cfg.source, "split": split, "src_lang": data_cfg.src_lang, "tgt_lang": data_cfg.tgt_lang}
    if data_cfg.source == "hub":
        out.update(hub=[data_cfg.hub_name, data_cfg.hub_config, data_cfg.hub_field, data_cfg[split_key]])
        return out
    if data_cfg.source in _WRITTEN:
        spec = _written_prefix(data_cfg, split)
    else:
        spec = data_cfg[files_key]
    aligned = [f"{spec}.{data_cfg.src_lang}", f"{spec}.{data_cfg.tgt_lang}"]
    paths = aligned if any(os.path.isfile(p) for p in aligned) else [spec]
    out["hub_field"] = data_cfg.hub_field
    out["files"] = [[os.path.abspath(p), *((os.stat(p).st_size, os.stat(p).st_mtime_ns) if os.path.exists(p)
                                            else (None, None))] for p in paths]
    return out
