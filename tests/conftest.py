"""Every test gets its own empty timing cache (``auto``'s measurements, :mod:`converters.cache`): no test
reads another's timings, and none writes to the user's cache directory (module-scoped fixtures, which run
before a test's own, share one for the session). Subprocesses inherit the variable.

tests/ itself goes on ``sys.path`` (pytest's default import mode puts it there too), so that test modules in
any sub-directory import the shared helpers: ``from helpers import needs``."""
import sys
from pathlib import Path

import pytest

if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session", autouse=True)
def _session_timing_cache(tmp_path_factory):
    from converters.cache import ENV

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV, str(tmp_path_factory.mktemp("timing_cache_session")))
        yield


@pytest.fixture(autouse=True)
def _own_timing_cache(tmp_path_factory, monkeypatch):
    from converters.cache import ENV

    monkeypatch.setenv(ENV, str(tmp_path_factory.mktemp("timing_cache")))


def pytest_configure(config):
    """Under ``pytest -n N`` (pytest-xdist) each worker's torch takes its share of the cores, not all of them:
    two workers with two threads each on two cores ran the suite only 16 % faster than one process."""
    import os

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        import torch

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // workers))
