"""A run's config file, `workdir/config.json`: written when training starts (`save_run_config`) and read back
over `default_config()` (`load_run_config`), so a run saved by an older version stays loadable; a run resumed
by a newer version keeps the model values it was trained with (`resume_legacy_model`)."""

from __future__ import annotations

import json
import logging
import os
import pathlib

import ml_collections

from jaxformer.checkpoint import CONFIG_FILE, CheckpointError
from jaxformer.config import LEGACY_MODEL_VALUES, default_config, saved_model_values

log = logging.getLogger(__name__)


def save_run_config(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> pathlib.Path:
    """Write `workdir/config.json` atomically (tmp file + rename)."""
    path = pathlib.Path(workdir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _merge(dst: ml_collections.ConfigDict, src: dict, prefix: str) -> None:
    for key, value in src.items():
        name = f"{prefix}{key}"
        if key not in dst:
            # A key this version does not know (a newer or older run): keep it, so nothing is dropped.
            log.warning("%s: unknown config key %s kept as saved", CONFIG_FILE, name)
            with dst.unlocked():
                dst[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
        elif isinstance(dst[key], ml_collections.ConfigDict):
            if not isinstance(value, dict):
                raise CheckpointError(f"{CONFIG_FILE}: {name} should be a section, found {value!r}")
            _merge(dst[key], value, f"{name}.")
        else:
            try:
                dst[key] = value
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"{CONFIG_FILE}: bad value for {name}: {e}") from None


def load_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The config a run was trained with: `workdir/config.json` over `default_config()`.

    Keys the saved file lacks (added to the library since) keep their defaults, so old runs stay loadable.
    """
    path = pathlib.Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: {workdir} is not a jaxformer run directory "
                              f"(train one with: python train.py --workdir {workdir})")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable: {e}") from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path} should hold a JSON object, found {type(saved).__name__}")
    if isinstance(saved.get("model"), dict):
        saved["model"] = saved_model_values(saved["model"])
    config = default_config()
    _merge(config, saved, "")
    return config


def resume_legacy_model(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """A workdir saved before a model option existed resumes with the value it was trained with."""
    saved = workdir / CONFIG_FILE
    if not saved.is_file():
        return
    try:
        model = json.loads(saved.read_text(encoding="utf-8")).get("model", {})
    except (OSError, ValueError, AttributeError):
        return  # the checkpoint store reports an unreadable run directory
    for key, value in LEGACY_MODEL_VALUES.items():
        if isinstance(model, dict) and key not in model and config.model[key] != value:
            log.warning("%s predates model.%s: resuming with model.%s=%s, as it was trained", saved, key, key, value)
            config.model[key] = value
