"""Shared test setup: several CPU devices, so multi-device code runs on a 2-core machine."""

import os
import tempfile

# The tests check behaviour, not speed, and on the CPU most of their time is XLA compiling many small programs:
# compile them quickly (the programs compute the same; the suite's time with and without: benchmarks/README.md,
# "The test suite"). Also given to the processes the tests start.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# Must happen before jax is imported anywhere: 4 host "devices" for the data-parallel tests.
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=4 {FAST_COMPILE}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The Hugging Face hub is unreachable here: local files only, never wait on the network.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# CTranslate2 on an AMD CPU: its default int8 backend (oneDNN) gave 0 of 60 greedy outputs equal to float32's
# on an AVX2 EPYC, where Intel MKL's gave 29 (docs/serving.md); before ctranslate2 is first imported.
os.environ.setdefault("CT2_USE_MKL", "1")
# One persistent compilation cache for the whole run: the processes the tests start (train.py and the CLI in
# the README test, the multi-process runs, the GPU check's dry run) compile many of the same programs. Made
# by the first process to import this file (the controller under pytest -n), inherited by the others.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR = tempfile.mkdtemp(prefix="jaxformer-test-jit-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
else:
    _CACHE_DIR = None

import pathlib  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
MULTI30K = REPO.parent / "shared" / "data" / "multi30k"
NUMBER_WORDS = REPO.parent / "shared" / "models" / "number_words"


@pytest.fixture(scope="session")
def multi30k_dir() -> pathlib.Path:
    """The real Multi30k En-De files beside the checkout (../shared/data/multi30k)."""
    if not (MULTI30K / "train.en").exists():
        pytest.fail(f"Multi30k data not found at {MULTI30K}; the tests expect ../shared beside the checkout")
    return MULTI30K


@pytest.fixture(scope="session")
def number_words():
    """The shared offline-default model (../shared/models/number_words: English number words to German), loaded."""
    if not (NUMBER_WORDS / "config.json").exists():
        pytest.fail(f"the shared model is not at {NUMBER_WORDS}; the tests expect ../shared beside the checkout")
    import jaxformer

    return jaxformer.load(NUMBER_WORDS)


@pytest.fixture(scope="session")
def multi30k_tokenizer(multi30k_dir, tmp_path_factory):
    """A small (1000-piece) shared BPE vocabulary, trained once on 4000 Multi30k pairs."""
    from helpers import multi30k_vocabulary

    return multi30k_vocabulary(multi30k_dir, 4000, 1000, tmp_path_factory.mktemp("vocab") / "vocab.model")


@pytest.fixture(scope="session")
def token_cache_dir(tmp_path_factory):
    """One folder for the data tests' token caches (helpers.data_config puts them there): caches of equal inputs
    are shared, as in use. A data test module asks for it with `pytestmark = pytest.mark.usefixtures(...)`."""
    import helpers

    helpers.CACHE_DIR = str(tmp_path_factory.mktemp("token_cache"))
    return helpers.CACHE_DIR


@pytest.fixture(scope="session")
def synthetic_setup(tmp_path_factory):
    """The offline task's files (2,000 pairs) and a small vocabulary trained on them, made once."""
    from jaxformer.config import default_config
    from jaxformer.data import Tokenizer, ensure_synthetic

    base = tmp_path_factory.mktemp("synthetic")
    config = default_config()
    config.data.update(source="synthetic", synthetic_size=2000, synthetic_dir=str(base / "data"))
    prefix = pathlib.Path(ensure_synthetic(config.data)) / "train"
    sentences = []
    for lang in ("en", "de"):
        sentences += (prefix.parent / f"train.{lang}").read_text(encoding="utf-8").splitlines()
    tokenizer = Tokenizer.train(sentences, 120, str(base / "vocab.model"))
    return str(base / "data"), tokenizer.path


@pytest.fixture(scope="session")
def bundle():
    """(model, params, tokenizer): the tiny copy model (helpers.trained_copy_model, ~10 s), trained once."""
    from helpers import trained_copy_model

    return trained_copy_model()


@pytest.fixture(scope="session")
def random_model():
    """A random tiny Transformer (helpers.RANDOM_CFG), which never says EOS, and its parameters."""
    import jax

    from helpers import RANDOM_CFG
    from jaxformer.model import Transformer, init_params

    return Transformer(RANDOM_CFG), init_params(RANDOM_CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread while a module's tests run (the Marian modules use it for all their tests)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The longest tests, started first under pytest -n so that the short ones fill the other worker around them
# (a two-minute test collected last runs alone at the end). Measured with --durations; substrings of node ids.
LONGEST_FIRST = ("test_readme.py::test_readme_commands_and_snippets_run", "test_readme.py::test_readme_benchmarks",
                 "test_gpu_check.py::test_dry_run", "test_finetune.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        return next((i for i, part in enumerate(LONGEST_FIRST) if part in item.nodeid), len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: the rest keep their order


def pytest_xdist_make_scheduler(config, log):
    """With `pytest -n N`: tests marked `xdist_group` (the multi-process ones) run on one worker, others spread."""
    if config.getvalue("dist") == "load":
        from xdist.scheduler import LoadGroupScheduling

        return LoadGroupScheduling(config, log)
    return None


def pytest_unconfigure(config):
    if _CACHE_DIR is not None and not hasattr(config, "workerinput"):
        shutil.rmtree(_CACHE_DIR, ignore_errors=True)
