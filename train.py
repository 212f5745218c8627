"""Train a Transformer: `python train.py [--config configs/<recipe>.py] [--config.train.steps=...] [--workdir DIR]`.

With no flags it runs configs/default.py, the offline number-words task (about 2 minutes on 2 CPU cores).
Any config value can be overridden from the command line; an unknown key is an error. Rerunning with the
same workdir resumes from its latest good checkpoint.
"""

import logging
import os
import re
import shlex
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
try:  # ml_collections applies --config.* overrides here, so an unknown key fails here
    _CONFIG = config_flags.DEFINE_config_file(
        "config", os.path.join(_HERE, "configs", "default.py"), "A recipe file in configs/ (a get_config() function).",
        lock_config=True)
except (AttributeError, KeyError) as e:
    _key = re.search(r"'(\w+)\\?'", str(e))
    _hint = re.search(r'Did you mean "(\w+)"', str(e))
    sys.exit(f"error: unknown config key {_key.group(1) if _key else str(e)!r} in a --config.* override"
             + (f"; did you mean {_hint.group(1)!r}?" if _hint else ""))
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (overrides config.train.workdir).")


def _setup_logging():
    """jaxformer's INFO lines, everyone else's warnings, in one plain format (absl's handler replaced)."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s] %(message)s", "%H:%M:%S"))
    logging.root.handlers = [handler]
    logging.root.setLevel(logging.WARNING)
    logging.getLogger("jaxformer").setLevel(logging.INFO)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    _setup_logging()
    from jaxformer.checkpoint import CheckpointError
    from jaxformer.data import DataError
    from jaxformer.parallel import DistributedError
    from jaxformer.preemption import Preempted
    from jaxformer.train import TrainingError, run

    config = _CONFIG.value
    if _WORKDIR.value:
        config.train.workdir = _WORKDIR.value
    try:
        result = run(config)
    except Preempted as e:
        command = shlex.join([os.path.basename(sys.executable)] + sys.argv)
        print(f"{e}: {command}", file=sys.stderr)
        return e.exit_code
    except (TrainingError, CheckpointError, DataError, DistributedError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a missing file, a full disk, an unreachable hub
        hint = ""
        if isinstance(e, ConnectionError) and config.data.source == "hub":
            hint = " (offline? read local files instead: --config.data.source=files with data.*_files set)"
        print(f"error: {e}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    summary = {k: v for k, v in result.items()
               if (k.startswith(("valid", "train_loss", "train_nll")) or k == "step") and not k.endswith("_tokens")}
    print("final: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    print(f"run directory: {result['workdir']} (metrics.jsonl, curves.png, tensorboard/, checkpoints/)")
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
