"""What several test modules share. tests/ is on ``sys.path`` (tests/conftest.py makes sure), so a test module
anywhere below imports this as ``from helpers import needs``."""
from __future__ import annotations

from types import ModuleType

import pytest

from sapp_compress.errors import ModelLoadError
from sapp_compress.io.extras import require


def needs(library: str | None, why: str = "this test") -> ModuleType | None:
    """The optional ``library`` (transformers, torchvision, timm: the extras ``hf`` / ``vision``), imported as
    the tool imports it (:func:`sapp_compress.io.extras.require`); when it is not installed the calling test,
    or the module that calls this at import, is skipped with a reason that names the library and the extra to
    install (``... needs transformers (No module named 'transformers'): pip install 'sapp-compress[hf]'``).
    ``None`` needs nothing. Only a missing library skips: any other error while importing it fails the
    test."""
    if library is None:
        return None
    try:
        return require(library, why)
    except ModelLoadError as e:
        pytest.skip(str(e), allow_module_level=True)
