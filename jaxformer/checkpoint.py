"""Checkpoints of a run (orbax), the run directory's layout, and checkpoint averaging.

A run directory ("workdir") holds:

    config.json          the run's full config (`jaxformer.run_config`)
    vocab.model          the sentencepiece model (written by `jaxformer.data.get_tokenizer`)
    checkpoints/<step>/  one orbax checkpoint per kept step, with the items
        params/            the model variables {"params": ...}, float32
        opt_state/         the optimizer state
        meta/              JSON: step, the run's PRNG key data, the validation bookkeeping (`jaxformer.choose`),
                           the wall-clock seconds spent so far
        data/              JSON: each process's training data iterator position
    metrics.jsonl        one JSON object per logged step / evaluation
    metrics.dropped.jsonl  records of steps a resumed run redid (kept, not deleted)
    tensorboard/         TensorBoard event files
    curves.png           loss / learning rate / BLEU curves
    train.log            everything jaxformer logged
    corrupt_checkpoints/ checkpoints that failed to restore, moved aside (never deleted)

Orbax writes each checkpoint under `<step>.orbax-checkpoint-tmp` and renames it to `<step>` only when
every item is written, so a run killed mid-save leaves a tmp folder that is never listed as a step;
`CheckpointStore` reports and removes such folders when a run resumes. A checkpoint that is listed but
does not restore (missing or damaged files) is reported, moved aside, and the previous one is used.

Averaging the last K checkpoints (Section 6.1: 5 for base, 20 for big) is `load_averaged(average_last=K)`;
from the shell: `python -m jaxformer.checkpoint average --workdir W --last K --out DIR`. `best=K`: the K best
by validation (`jaxformer.choose`), which rotation spares with train.keep_best >= K; `from_best=K`: the best
and the K - 1 kept after it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pathlib
import shutil
import sys
import time
from typing import Any, Iterable

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxformer.choose import Choice, best_first
from jaxformer.staging import check_output_dir

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.model"
CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt_checkpoints"
_TMP_MARKER = ".orbax-checkpoint-tmp"
_ITEMS = ("params", "opt_state", "meta", "data")


class CheckpointError(RuntimeError):
    """A checkpoint (or the run directory around it) is missing or unreadable."""


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint of a different model (parameter shapes differ from the config's)."""


# ------------------------------------------------------------------------------------------ checkpoints


@dataclasses.dataclass
class Restored:
    """One restored checkpoint."""

    step: int
    params: Any
    opt_state: Any
    rng: np.ndarray  # PRNG key data (uint32)
    data_state: dict
    choice: dict | None = None  # the validation bookkeeping (`jaxformer.choose.Choice.state_dict`), if saved
    train_seconds: float = 0.0  # wall-clock seconds the run had spent at this step, over resumes


def _abstract(tree: Any) -> Any:
    """Shape/dtype/sharding stand-ins that tell orbax where to put each restored array."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _check_same_shapes(metadata: Any, abstract: Any, where: pathlib.Path) -> None:
    saved = {jax.tree_util.keystr(k): tuple(m.shape) for k, m in jax.tree_util.tree_leaves_with_path(metadata)}
    wanted = {jax.tree_util.keystr(k): tuple(a.shape) for k, a in jax.tree_util.tree_leaves_with_path(abstract)}
    if saved == wanted:
        return
    differ = sorted(k for k in saved.keys() & wanted.keys() if saved[k] != wanted[k])
    detail = [f"{k}: saved {saved[k]}, config {wanted[k]}" for k in differ[:3]]
    detail += [f"{k}: only in the checkpoint" for k in sorted(saved.keys() - wanted.keys())[:2]]
    detail += [f"{k}: only in the config's model" for k in sorted(wanted.keys() - saved.keys())[:2]]
    raise CheckpointMismatchError(f"checkpoint {where} holds a different model than the config describes "
                                  f"({'; '.join(detail)}); use the run's own model settings or a new workdir")


def _single_device_abstract(metadata: Any) -> Any:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)


class CheckpointStore:
    """The orbax `CheckpointManager` of one run directory's `checkpoints/`, with fallback on bad steps."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 5, keep_best: int = 0, async_save: bool = True,
                 read_only: bool = False):
        self.directory = pathlib.Path(directory).absolute()
        self.read_only, self.keep, self.keep_best = read_only, keep, keep_best
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"no checkpoints: {self.directory} does not exist")
        if not read_only:
            self._remove_partial()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep and keep > 0 and not read_only and not keep_best else None,  # else save()
            save_interval_steps=0 if read_only else 1,  # orbax warns unless a reader says it saves nothing
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
        )
        handlers = {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
        absl_log = logging.getLogger("absl")
        level = absl_log.level
        if read_only:  # orbax warns that the directory "is read only", which is what a reader asked for
            absl_log.setLevel(logging.ERROR)
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        finally:
            absl_log.setLevel(level)

    def _remove_partial(self) -> None:
        """Delete what interrupted saves left (never a complete checkpoint: those have been renamed)."""
        if not self.directory.is_dir() or jax.process_index() != 0:
            return
        for path in sorted(self.directory.iterdir()):
            if _TMP_MARKER in path.name:
                log.warning("removing the partial checkpoint %s (a save was interrupted)", path)
                shutil.rmtree(path, ignore_errors=True)

    @property
    def steps(self) -> list[int]:
        """Steps with a complete (renamed) checkpoint, ascending."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, *, params: Any, opt_state: Any, rng: Any, data_state: dict,
             choice: Choice | None = None, train_seconds: float | None = None) -> None:
        """Start writing checkpoint `step` (in the background when async); `wait()` to be sure it landed."""
        meta = {"step": int(step), "rng": np.asarray(jax.device_get(rng)).astype(np.uint32).tolist()}
        if train_seconds is not None:
            meta["train_seconds"] = round(float(train_seconds), 3)
        if choice is not None:
            meta["choice"] = choice.state_dict()
        args = ocp.args.Composite(params=ocp.args.StandardSave(params),
                                  opt_state=ocp.args.StandardSave(opt_state),
                                  meta=ocp.args.JsonSave(meta),
                                  data=ocp.args.JsonSave(data_state))
        self._manager.save(int(step), args=args, force=True)
        if self.keep_best:  # rotation: the `keep` newest and the `keep_best` best by the processes' agreed choice
            steps = sorted(set(self.steps) | {int(step)})
            spared = set(steps[-self.keep:]) | set(choice.ranked(steps)[:self.keep_best] if choice else ())
            for old in (s for s in steps if s not in spared):
                self._manager.delete(old)  # orbax deletes on process 0 and syncs the processes

    def restore(self, step: int, *, params_like: Any = None, opt_state_like: Any = None) -> Restored:
        """Checkpoint `step`, arrays placed like `params_like` / `opt_state_like` (live or abstract trees).

        Without `params_like` the parameters land on this process's first device; without
        `opt_state_like` the optimizer state is not read. Raises CheckpointError if it does not restore.
        """
        try:
            metadata = self._manager.item_metadata(step)["params"]
            if metadata is None:
                raise FileNotFoundError("its params item is missing")
        except Exception as e:
            raise self._unreadable(step, e) from e
        if params_like is None:
            params_abstract = _single_device_abstract(metadata)
        else:
            params_abstract = _abstract(params_like)
            _check_same_shapes(metadata, params_abstract, self.directory / str(step))
        try:
            items = {"params": ocp.args.StandardRestore(params_abstract),
                     "meta": ocp.args.JsonRestore(), "data": ocp.args.JsonRestore()}
            if opt_state_like is not None:
                items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state_like))
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
            meta = restored["meta"]
            if not isinstance(meta, dict) or int(meta.get("step", -1)) != step or "rng" not in meta:
                raise ValueError(f"its meta item is malformed: {meta!r}")
            data_state = restored["data"]
            if not isinstance(data_state, dict):
                raise ValueError(f"its data item is malformed: {data_state!r}")
        except Exception as e:  # orbax/tensorstore raise many kinds; all mean "this step is unusable"
            raise self._unreadable(step, e) from e
        return Restored(step=step, params=restored["params"],
                        opt_state=restored["opt_state"] if opt_state_like is not None else None,
                        rng=np.asarray(meta["rng"], dtype=np.uint32), data_state=data_state,
                        choice=meta.get("choice"), train_seconds=float(meta.get("train_seconds", 0.0)))

    def choice(self) -> Choice | None:
        """The validation bookkeeping of the newest readable checkpoint that holds it (None if none does)."""
        for step in reversed(self.steps):
            try:
                meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                return Choice.from_state_dict(meta["choice"])
            except Exception as e:  # noqa: BLE001 - unreadable or without it: an older one may hold it
                log.debug("%s", self._unreadable(step, e))
        return None

    def _unreadable(self, step: int, error: Exception) -> CheckpointError:
        message = " ".join(str(error).split())[:300]
        return CheckpointError(f"checkpoint {self.directory / str(step)} does not restore: "
                               f"{type(error).__name__}: {message}")

    def restore_latest(self, *, params_like: Any, opt_state_like: Any) -> Restored | None:
        """The newest checkpoint that restores, or None when there is none.

        Each newer one that fails is logged and moved to `../corrupt_checkpoints/` (so a resumed run can
        write that step again, and nothing is deleted); raises if checkpoints exist but none restores.
        """
        steps = self.steps
        failures = []
        for step in reversed(steps):
            try:
                restored = self.restore(step, params_like=params_like, opt_state_like=opt_state_like)
            except CheckpointMismatchError:
                raise  # a different model, not a damaged file: leave it where it is
            except CheckpointError as e:
                failures.append(step)
                log.error("%s", e)
                self._quarantine(step)
                continue
            if failures:
                log.warning("fell back to checkpoint step %d after %d unreadable newer one(s): steps %s",
                            step, len(failures), failures)
            return restored
        if failures:
            raise CheckpointError(f"none of the checkpoints in {self.directory} restores (steps {failures}; "
                                  f"moved to {self.directory.parent / CORRUPT_DIR}); start a new workdir")
        return None

    def _quarantine(self, step: int) -> None:
        if self.read_only or jax.process_index() != 0:
            return
        source = self.directory / str(step)
        target = self.directory.parent / CORRUPT_DIR / str(step)
        if target.exists():
            target = target.with_name(f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(source), str(target))
        log.warning("moved the unreadable checkpoint %s to %s", source, target)
        self._manager.reload()

    def wait(self) -> None:
        """Block until every started save has been written and renamed into place."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------------------------------------- averaging


class _RunningMean:
    """Element-wise mean of parameter trees, accumulated in float64 one tree at a time (memory: two trees)."""

    def __init__(self):
        self.total, self.count = None, 0

    def add(self, tree: Any) -> None:
        tree = jax.tree.map(lambda x: np.asarray(x, dtype=np.float64), jax.device_get(tree))
        if self.total is None:
            self.total = tree
        elif jax.tree.structure(tree) != jax.tree.structure(self.total):
            raise ValueError("cannot average checkpoints of different models (parameter trees differ)")
        else:
            self.total = jax.tree.map(np.add, self.total, tree)
        self.count += 1

    def result(self) -> Any:
        if not self.count:
            raise ValueError("no parameter trees to average")
        return jax.device_put(jax.tree.map(lambda x: (x / self.count).astype(np.float32), self.total))


def average_checkpoints(params_list: Iterable[Any]) -> Any:
    """The element-wise mean of several parameter trees of one model, float32 (Section 6.1)."""
    mean = _RunningMean()
    for params in params_list:
        mean.add(params)
    return mean.result()


def _too_few_from_best(directory: pathlib.Path, order: list[int], asked: int, used: list[int] | None = None,
                       unreadable: str = "") -> CheckpointError:
    """The error of `from_best` = `asked` when the run keeps fewer (readable) checkpoints from its best on."""
    have = f"{len(order)} checkpoint(s)" if used is None else f"{len(used)} readable checkpoint(s)"
    return CheckpointError(f"{directory} keeps {have} from its best (step {order[0]}) on{unreadable}, fewer than "
                           f"the {asked} asked for; lower --average-from-best, or train on past the best keeping "
                           f"more (train.keep_checkpoints)")


def load_averaged(workdir: str | os.PathLike, *, step: int | None = None, average_last: int = 1,
                  allow_fewer: bool = False, best: int = 0, from_best: int = 0) -> tuple[Any, list[int]]:
    """The run's parameters ({"params": ...}, float32) at `step` (default: the newest that restores),
    averaged over the `average_last` newest readable checkpoints up to it (Section 6.1), and the steps
    averaged (ascending). Unreadable checkpoints are logged and skipped. With `best` = K: the K best
    checkpoints by the run's validation metric instead (train.best_metric, kept by train.keep_best). With
    `from_best` = K: the best checkpoint and the K - 1 kept after it (what a run stopped by patience and
    averaged over its last epochs holds, as fairseq's recipes do).

    With `allow_fewer`, a run that kept fewer readable checkpoints than `average_last` averages those it
    has (with a warning) instead of failing: what a default should do; an explicit request fails.
    """
    if (best or from_best) and (step is not None or average_last != 1 or (best and from_best)):
        raise ValueError("the best checkpoints are chosen by validation, not by step or recency: give best or "
                         "from_best alone")
    if (average_last := best or from_best or average_last) < 1:
        raise ValueError(f"average_last must be >= 1, got {average_last}")
    directory = pathlib.Path(workdir) / CHECKPOINT_DIR
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoints: {directory} does not exist; train first "
                              f"(python train.py --workdir {workdir})")
    with CheckpointStore(directory, read_only=True) as store:
        steps = store.steps
        if step is not None:
            if step not in steps:
                raise CheckpointError(f"no checkpoint for step {step} in {directory}; kept steps: {steps}")
            steps = [s for s in steps if s <= step]
        mean, used, skipped = _RunningMean(), [], []
        if best:
            order = best_first(store.choice(), steps, best, workdir)
        elif from_best:
            [first] = best_first(store.choice(), steps, 1, workdir)
            order = [s for s in steps if s >= first]
            if len(order) < from_best:  # too few kept: fail before restoring any
                raise _too_few_from_best(directory, order, from_best)
        else:
            order = list(reversed(steps))
        for s in order:
            if len(used) == average_last:
                break
            try:
                mean.add(store.restore(s).params)
            except CheckpointError as e:
                log.error("%s; skipping it", e)
                skipped.append(s)
                continue
            used.append(s)
    used.sort()
    unreadable = f" ({len(skipped)} unreadable: {skipped})" if skipped else ""
    if len(used) < average_last:
        if from_best:
            raise _too_few_from_best(directory, order, from_best, used, unreadable)
        if not (allow_fewer and used):
            raise CheckpointError(f"{directory} has {len(used)} readable checkpoint(s){unreadable}, fewer than the "
                                  f"{average_last} asked for; lower average_last, train longer, or keep more "
                                  f"(train.keep_checkpoints)")
        log.warning("%s has only %d readable checkpoint(s)%s of the %d to average; averaging steps %s",
                    directory, len(used), unreadable, average_last, used)
    elif skipped:
        log.warning("used checkpoint steps %s, skipped unreadable %s", used, skipped)
    elif average_last > 1:
        log.info("averaged the parameters of checkpoint steps %s", used)
    return mean.result(), used


# ------------------------------------------------------------------------------------------------- CLI


def _save_params(params: Any, out: str | os.PathLike) -> pathlib.Path:
    out = pathlib.Path(out).absolute()
    check_output_dir(out, CheckpointError)
    if out.is_dir():
        out.rmdir()  # empty: orbax refuses an existing folder (it writes its own and renames it into place)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(out, params)
    checkpointer.wait_until_finished()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxformer.checkpoint",
                                     description="Inspect a run's checkpoints or average the last K of them.")
    sub = parser.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="list the kept checkpoint steps")
    ls.add_argument("--workdir", required=True)
    avg = sub.add_parser("average", help="average the last K checkpoints and save the parameters (orbax)")
    avg.add_argument("--workdir", required=True)
    avg.add_argument("--last", type=int, required=True, help="how many of the newest checkpoints (paper: 5 / 20)")
    avg.add_argument("--step", type=int, default=None, help="newest step to include (default: the newest)")
    avg.add_argument("--out", required=True, help="a new (or empty) directory for the averaged parameters")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.command == "list":
            store = CheckpointStore(pathlib.Path(args.workdir) / CHECKPOINT_DIR, read_only=True)
            print(" ".join(map(str, store.steps)) or "no checkpoints")
            store.close()
        else:
            check_output_dir(pathlib.Path(args.out), CheckpointError)  # before the slow part
            params, _ = load_averaged(args.workdir, step=args.step, average_last=args.last)
            print(f"wrote {_save_params(params, args.out)}")
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
