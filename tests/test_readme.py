"""Every command and Python snippet README.md shows runs, at tiny sizes.

Commands come from the README's ```bash blocks and snippets from its ```python blocks, so a command
added to the README without a rule here fails `test_every_readme_command_has_a_smoke_rule`. Run
directories (`runs/...`) go to a temporary folder; training commands get tiny model and step overrides
appended (later flags win). The hub is unreachable here, so the commands that train from the hub run
with `data.source=files` on the local Multi30k copy: the same code after the loading step.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import shlex
import subprocess
import time
import sys

import pytest

from conftest import FAST_COMPILE, MULTI30K, REPO

README = (REPO / "README.md").read_text(encoding="utf-8")
HAVE_TORCH = importlib.util.find_spec("torch") is not None
HAVE_INTEROP = all(importlib.util.find_spec(m) is not None for m in ("ctranslate2", "transformers", "torch"))

TINY_MODEL = ("--config.model.d_model=32 --config.model.d_ff=64 --config.model.num_heads=2 "
              "--config.model.num_encoder_layers=1 --config.model.num_decoder_layers=1 "
              "--config.train.progress_bar=False --config.train.eval_bleu_sentences=4 "
              "--config.train.warmup_steps=10 --config.train.log_every=10")
# The default run feeds the translate/evaluate/export commands: 5 checkpoints for its train.average_last=5.
TINY_DEFAULT = (TINY_MODEL + " --config.data.synthetic_size=2000 --config.train.steps=50 "
                "--config.train.checkpoint_every_steps=10 --config.train.eval_every=50")
TINY_REAL = (TINY_MODEL + " --config.train.steps=3 --config.train.checkpoint_every_steps=3 "
             "--config.train.eval_every=3 --config.train.average_last=1 --config.data.vocab_size=300 "
             "--config.data.vocab_sample_size=2000 --config.data.tokens_per_batch=256 "
             "--config.train.grad_accum_steps=1 "
             "--config.train.checkpoint_every_minutes=0 --config.model.dtype=float32")
# Fine-tuning the README's imported tiny Multi30k model (its model.* keys are that model's).
TINY_FINETUNE = ("--config.train.steps=3 --config.train.checkpoint_every_steps=3 --config.train.eval_every=3 "
                 "--config.train.warmup_steps=10 --config.train.eval_bleu_sentences=4 "
                 "--config.train.progress_bar=False --config.data.tokens_per_batch=256")
TINY_BENCH_MODEL = " ".join(f"--set {kv}" for kv in (
    "model.d_model=32", "model.d_ff=64", "model.num_heads=2", "model.num_encoder_layers=1",
    "model.num_decoder_layers=1", "data.vocab_size=300", "data.vocab_sample_size=2000",
    "data.tokens_per_batch=256", "train.eval_bleu_sentences=4", "train.average_last=1",
    "train.checkpoint_every_steps=3", "train.eval_every=3"))

# (regular expression on the README command, what to append to it); the first match wins.
RULES = [
    (r"^pip install ", None),                 # checked against .ci/run, not run again
    (r"^python -m pytest ", None),            # checked against .ci/run, not run recursively
    (r"^python train\.py$", TINY_DEFAULT),
    (r"^python train\.py --config configs/multi30k\.py --config\.data\.source=files$", TINY_REAL),
    # The hub command is the files run above but for the hub, which is unreachable here, and the WMT14
    # recipes differ from it only in config values that test_train's recipe test checks: not run again.
    (r"^python train\.py --config configs/(multi30k|wmt14_base|wmt14_big)\.py", None),
    (r"^python benchmarks/train_throughput\.py", "--shapes tiny --repeats 1"),
    # PyTorch is a benchmark-only extra ('.[bench]'): the comparison runs where it is installed.
    (r"^python benchmarks/train_vs_pytorch\.py", "--shapes tiny --repeats 1" if HAVE_TORCH else None),
    (r"^python benchmarks/step_ab\.py", "--shapes tiny --repeats 1"),
    (r"^python benchmarks/decode_speed\.py --random", "--sentences 2 --src-tokens 3 --max-len 6 --repeats 1"),
    (r"^python benchmarks/decode_speed\.py", "--limit 4 --batch-size 4 --average-last 1"),
    (r"^python benchmarks/search_ab\.py", "--models number_words --limit 8 --passes 1 --beams 2"
                                          + ("" if HAVE_INTEROP else " --no-ct2")),
    (r"^python benchmarks/multi30k_quality\.py", f"--steps 3 --eval-limit 4 {TINY_BENCH_MODEL}"),
    (r"^python benchmarks/input_pipeline\.py", "--repeats 1 --wmt-pairs 2000 --vocab-size 500 --steps 4"),
    (r"^python train\.py --config configs/finetune\.py", (TINY_FINETUNE if HAVE_INTEROP else None)),
    (r"^jaxformer evaluate --model runs/imported", ("--limit 8" if HAVE_INTEROP else None)),
    # Other libraries' formats need the '.[interop]' extra (CI installs it).
    (r"^jaxformer (export .*--format (ctranslate2|marian)|import-marian)", "" if HAVE_INTEROP else None),
    (r"^jaxformer score ", None),  # tests/test_score.py runs the same command on the shared model
    (r"^(echo .*\| )?jaxformer ", ""),
    (r"^python -m jaxformer\.", ""),
]


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def readme_lines() -> list[str]:
    lines = []
    for block in readme_blocks("bash"):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def readme_commands() -> list[str]:
    """Each command of the README's shell lines, `a && b` counting as two."""
    return [part.strip() for line in readme_lines() for part in line.split(" && ")]


def rule_for(command: str):
    for pattern, extra in RULES:
        if re.search(pattern, command):
            return pattern, extra
    return None


def test_every_readme_command_has_a_smoke_rule():
    commands = readme_commands()
    assert any(c.startswith("python train.py") for c in commands)
    missing = [c for c in commands if rule_for(c) is None]
    assert not missing, f"README commands with no smoke rule in tests/test_readme.py: {missing}"


def test_readme_install_and_test_commands_are_what_ci_runs():
    ci = (REPO / ".ci" / "run").read_text()
    first = readme_lines()[0]
    assert first == "pip install -e '.[test]' && python train.py", "the first command installs and runs the default"
    assert "pip install" in ci and "-e '.[test]'" in ci
    test_command = next(c for c in readme_commands() if c.startswith("python -m pytest"))
    assert test_command.replace("python", "python3", 1) in ci


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A temporary folder for runs/, with the README's numbers.en input file."""
    root = tmp_path_factory.mktemp("readme")
    (root / "numbers.en").write_text("three hundred five\nseventeen\n", encoding="utf-8")
    return root


def run_readme_command(command: str, extra: str, sandbox: pathlib.Path) -> subprocess.CompletedProcess:
    command = command.replace("runs/", f"{sandbox}/runs/")
    for name in ("numbers.en", "numbers.de", "attention.png"):
        command = re.sub(rf"(?<![\w/.]){re.escape(name)}", str(sandbox / name), command)
    jaxformer = f"{shlex.quote(sys.executable)} -m jaxformer.cli"
    command = re.sub(r"(^|\| )jaxformer ", lambda m: f"{m.group(1)}{jaxformer} ", command)
    command = re.sub(r"^python ", f"{shlex.quote(sys.executable)} ", command)
    if "train.py" in command:
        extra += f" --config.data.synthetic_dir={sandbox}/synthetic"
        if "--workdir" not in command:  # the recipe's own runs/<name>, inside the sandbox
            recipe = re.search(r"configs/(\w+)\.py", command)
            extra += f" --workdir {sandbox}/runs/{recipe.group(1) if recipe else 'default'}"
    assert "runs/" not in command.replace(f"{sandbox}/runs/", ""), command
    env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_FLAGS=FAST_COMPILE)  # no device count: train.py's own
    return subprocess.run(f"{command} {extra}", shell=True, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def stands_alone(command: str) -> bool:
    """A benchmark that reads no run: it can run beside the commands that make and use runs/."""
    return command.startswith("python benchmarks/") and "runs/" not in command


def run_commands(commands: list[str], sandbox: pathlib.Path) -> dict[str, str]:
    """Runs each command with its smoke rule, in order; returns each one's standard output."""
    outputs = {}
    for command in commands:
        _, extra = rule_for(command)
        if extra is None:
            continue
        started = time.monotonic()
        result = run_readme_command(command, extra, sandbox)
        print(f"{time.monotonic() - started:6.1f} s  {command}")
        assert result.returncode == 0, f"README command failed: {command}\n{result.stdout[-3000:]}\n" \
                                       f"{result.stderr[-3000:]}"
        outputs[command] = result.stdout
        if command == "python train.py":  # the device line is logged
            outputs[command] += result.stderr
    return outputs


def test_readme_commands_and_snippets_run(sandbox):
    """In README order: later commands and the snippets use the runs the first ones make."""
    outputs = run_commands([c for c in readme_commands() if not stands_alone(c)], sandbox)
    # On a CPU, train.py makes every core a JAX device and splits each batch over them.
    default_train = outputs["python train.py"]
    assert f"; {os.cpu_count()} device(s) over 1 process(es)" in default_train, default_train[-2000:]
    # What the commands promise to leave behind.
    assert (sandbox / "runs" / "default" / "curves.png").exists()
    assert len(list((sandbox / "runs" / "default" / "checkpoints").iterdir())) >= 5
    assert (sandbox / "runs" / "default-export" / "params.safetensors").exists()
    assert (sandbox / "runs" / "default" / "eval" / "bleu.json").exists()
    assert (sandbox / "runs" / "default" / "evaluation" / "test" / "bleu.json").exists()  # evaluate without --out
    assert (sandbox / "attention.png").stat().st_size > 0
    assert len((sandbox / "numbers.de").read_text(encoding="utf-8").splitlines()) == 2
    translate_stdin = next(o for c, o in outputs.items() if c.startswith("echo"))
    assert len(translate_stdin.strip().splitlines()) == 1

    blocks = readme_blocks("python")
    assert blocks, "README shows no Python"
    for block in blocks:
        if re.search(r"^(import|from) (ctranslate2|transformers)", block, flags=re.M) and not HAVE_INTEROP:
            continue
        code = block.replace('"runs/', f'"{sandbox}/runs/')
        env = dict(os.environ, XLA_FLAGS=FAST_COMPILE)
        result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, f"README snippet failed:\n{block}\n{result.stderr[-3000:]}"


def test_readme_benchmarks_that_read_no_run_run(sandbox):
    """The benchmark commands that need no run, as a second test that pytest -n runs beside the first."""
    commands = [c for c in readme_commands() if stands_alone(c)]
    assert any("train_throughput" in c for c in commands)
    outputs = run_commands(commands, sandbox)
    assert any("tokens_per_s" in o for c, o in outputs.items() if "train_throughput" in c)
    assert any('"same_tokens": true' in o for c, o in outputs.items() if "--compare" in c)
    if HAVE_TORCH:
        assert any('"jax_over_torch_speed"' in o for c, o in outputs.items() if "train_vs_pytorch" in c)
    pipeline = [o for c, o in outputs.items() if "input_pipeline" in c]
    assert pipeline and all('"pass": "first"' in o and '"pass": "cached"' in o and "padding_efficiency" in o
                            for o in pipeline)
    assert any('"loop_over_alone"' in o for o in pipeline)
