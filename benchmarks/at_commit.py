"""The jaxformer package as it was at a git commit, importable beside the current one (for A/B timings).

    old = package_at("5ddbeec")          # -> the module `jaxformer_5ddbeec`, e.g. old.decode.beam_search

`git archive` extracts the commit's jaxformer/ into a temporary folder under another package name (its
own `jaxformer` imports renamed), so both versions run in one process and can be timed in turn under the
same machine load. Replaces keeping verbatim copies of old files in the tree.
"""

from __future__ import annotations

import atexit
import importlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def package_at(rev: str):
    """Import jaxformer/ of commit `rev` as `jaxformer_<rev>` (with its model, decode and steps modules);
    exit with one line if the commit is not here."""
    try:
        archive = subprocess.run(["git", "-C", REPO, "archive", "--format=tar", rev, "jaxformer"],
                                 check=True, capture_output=True).stdout
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        detail = e.stderr.decode(errors="replace").strip() if isinstance(e, subprocess.CalledProcessError) else e
        sys.exit(f"error: cannot read jaxformer/ at commit {rev!r} ({detail}); this checkout lacks it "
                 f"(a shallow clone?): fetch the history or choose another commit")
    name = "jaxformer_" + re.sub(r"\W", "_", rev)
    root = tempfile.mkdtemp(prefix="jaxformer-at-")
    atexit.register(shutil.rmtree, root, True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            path = os.path.join(root, name, os.path.relpath(member.name, "jaxformer"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            text = tar.extractfile(member).read()
            if member.name.endswith(".py"):
                text = re.sub(rb"\bjaxformer(?=[.\s])", name.encode(), text)
            with open(path, "wb") as f:
                f.write(text)
    sys.path.insert(0, root)
    package = importlib.import_module(name)
    for module in ("model", "decode", "steps"):  # what the A/B benchmarks call (the package imports none)
        importlib.import_module(f"{name}.{module}")
    return package
