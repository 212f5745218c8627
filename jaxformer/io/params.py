"""The params tree as the formats store it: flat '/'-joined paths to numpy arrays, checked against the layout."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np
from flax import traverse_util

from jaxformer.model import unwrap  # io.params.unwrap too, for the formats


def flatten(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """'/'-joined path -> numpy array (on the host), of {"params": tree} or the bare tree."""
    flat = traverse_util.flatten_dict(jax.device_get(unwrap(params)), sep="/")
    return {key: np.asarray(value) for key, value in flat.items()}


def unflatten(flat: Mapping[str, Any]) -> dict:
    """The nested tree of '/'-joined paths."""
    return traverse_util.unflatten_dict({tuple(key.split("/")): value for key, value in flat.items()})


def mismatch(want: Mapping[str, tuple], got: Mapping[str, tuple]) -> str | None:
    """What differs between two path -> shape maps (the first few of each), or None when they are equal."""
    if dict(want) == dict(got):
        return None
    missing = sorted(set(want) - set(got))[:5]
    extra = sorted(set(got) - set(want))[:5]
    wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])[:5]
    return f"missing {missing}, unexpected {extra}, wrong shape {wrong}"


def save_safetensors(arrays: Mapping[str, np.ndarray], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> None:
    """safetensors' `save_file`, the same bytes for the same arrays: safetensors writes the metadata in the order
    of a Rust HashMap, seeded anew for every file, so its header is written again with the metadata sorted."""
    from safetensors.numpy import save

    blob = save(dict(arrays), metadata=dict(metadata) if metadata else None)
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + size])  # the tensors in safetensors' own (deterministic) order
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-aligned, as safetensors pads it
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        f.write(memoryview(blob)[8 + size:])
