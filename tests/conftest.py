"""Shared fixtures: a tiny random Llama with a byte-level tokenizer (fast, CPU-only)."""

import os
from pathlib import Path

# OpenMP threads that spin while waiting make torch in the main thread ~30x slower on a shared, oversubscribed
# CPU (2 cores at load ~18: 3.9 s vs 0.12 s per tiny-model step); must be set before torch starts OpenMP
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ../shared/data; tests that need it skip when it is absent."""
    if not SHARED_DATA.exists():
        pytest.skip(f"reference data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def tiny():
    """A fresh tiny Llama + byte tokenizer (seeded)."""
    from fedsafe.models import byte_tokenizer, tiny_llama

    tok = byte_tokenizer()
    return tiny_llama(tok, seed=0), tok


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # the dequantised embedded model is shared through the default cache (built once, ~30 s); tests that
    # write other cache entries point FEDSAFE_CACHE at a temporary directory
    if "FEDSAFE_CACHE" not in os.environ:
        monkeypatch.setenv("FEDSAFE_CACHE", str(Path.home() / ".cache" / "fedsafe"))
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield


def pytest_collection_modifyitems(config, items):
    if os.environ.get("FEDSAFE_SLOW") == "1" or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow end-to-end test: run with FEDSAFE_SLOW=1 or -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
