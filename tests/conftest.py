"""Shared fixtures: a tiny random Llama with a byte-level tokenizer (fast, CPU-only).

Two environment variables let the suite be run on other floating-point paths, to show that no test depends on
the exact outcome of one machine's training run (issue 15):

- ``FEDSAFE_TEST_SEED`` (default 0) feeds every seed a test chooses arbitrarily: the tiny model's init, the
  sampled data, the experiment seed of the small end-to-end runs (fixture ``test_seed``).
- ``FEDSAFE_TEST_THREADS`` (default: min(2, CPUs)) is ``torch.set_num_threads`` for every test, and
  ``OMP_NUM_THREADS`` for the subprocesses the tests start, so reductions run in another order.
- ``FEDSAFE_TEST_FLUSH_DENORMAL=1`` flushes denormal floats to zero (``torch.set_flush_denormal``).

    FEDSAFE_TEST_SEED=1 FEDSAFE_TEST_THREADS=1 python -m pytest tests
"""

import os
from pathlib import Path

# OpenMP threads that spin while waiting make torch in the main thread ~30x slower on a shared, oversubscribed
# CPU (2 cores at load ~18: 3.9 s vs 0.12 s per tiny-model step); must be set before torch starts OpenMP
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

TEST_SEED = int(os.environ.get("FEDSAFE_TEST_SEED", "0"))
THREADS_FROM_ENV = bool(os.environ.get("FEDSAFE_TEST_THREADS"))
TEST_THREADS = int(os.environ["FEDSAFE_TEST_THREADS"]) if THREADS_FROM_ENV else max(1, min(2, os.cpu_count() or 1))
FLUSH_DENORMAL = os.environ.get("FEDSAFE_TEST_FLUSH_DENORMAL") == "1"
if THREADS_FROM_ENV:  # subprocesses (CLI, Flower nodes) start torch with the same thread count
    os.environ["OMP_NUM_THREADS"] = str(TEST_THREADS)

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_report_header(config):
    return (f"fedsafe: FEDSAFE_TEST_SEED={TEST_SEED} FEDSAFE_TEST_THREADS={TEST_THREADS}"
            f"{'' if THREADS_FROM_ENV else ' (default)'} flush_denormal={FLUSH_DENORMAL} torch={torch.__version__}")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ../shared/data; tests that need it skip when it is absent."""
    if not SHARED_DATA.exists():
        pytest.skip(f"reference data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def test_seed() -> int:
    """The suite's global seed (FEDSAFE_TEST_SEED, default 0) for every seed a test picks arbitrarily."""
    return TEST_SEED


@pytest.fixture
def tiny(test_seed):
    """A fresh tiny Llama + byte tokenizer (seeded with the suite's seed)."""
    from fedsafe.models import byte_tokenizer, tiny_llama

    tok = byte_tokenizer()
    return tiny_llama(tok, seed=test_seed), tok


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # the dequantised embedded model is shared through the default cache (built once, ~30 s); tests that
    # write other cache entries point FEDSAFE_CACHE at a temporary directory
    if "FEDSAFE_CACHE" not in os.environ:
        monkeypatch.setenv("FEDSAFE_CACHE", str(Path.home() / ".cache" / "fedsafe"))
    torch.set_num_threads(TEST_THREADS)
    torch.set_flush_denormal(FLUSH_DENORMAL)
    yield


@pytest.fixture
def one_thread():
    """Many tiny training steps: on a shared, oversubscribed CPU one torch thread is ~5x faster (unless the suite
    runs on a chosen thread count, FEDSAFE_TEST_THREADS). Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    if os.environ.get("FEDSAFE_TEST_THREADS"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("FEDSAFE_SLOW") == "1" or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow end-to-end test: run with FEDSAFE_SLOW=1 or -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
