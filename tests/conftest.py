"""Every test gets its own empty timing cache (``auto``'s measurements, :mod:`converters.cache`): no test reads
another's timings, and none writes to the user's cache directory (module-scoped fixtures, which run before a
test's own, share one for the session). Subprocesses inherit the variable."""
import pytest


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
