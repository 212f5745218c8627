"""Shared test setup: several CPU devices, so multi-device code runs on a 2-core machine."""

import os

# Must happen before jax is imported anywhere: 4 host "devices" for the data-parallel tests.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
MULTI30K = REPO.parent / "shared" / "data" / "multi30k"


@pytest.fixture(scope="session")
def multi30k_dir() -> pathlib.Path:
    """The real Multi30k En-De files beside the checkout (../shared/data/multi30k)."""
    if not (MULTI30K / "train.en").exists():
        pytest.fail(f"Multi30k data not found at {MULTI30K}; the tests expect ../shared beside the checkout")
    return MULTI30K
