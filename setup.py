"""Build hooks; the metadata is in setup.cfg.

The install puts one start-up file in site-packages, ``sapp_compress_torchvision.pth``, in a regular wheel
(``build_py``) and in an editable install (``editable_wheel``). Python runs its one line at start-up: it loads
``sapp_compress/io/torchvision_compat.py`` by path (standard library only, not the package, which imports
torch) and installs its import hook, so that in an environment where torchvision's compiled ops do not load
with the installed torch (a CPU torch beside the index's torchvision wheel) a user's own ``import
torchvision`` works without ``import sapp_compress`` first. The hook does nothing unless torchvision's import
is about to fail for want of those ops; ``SAPP_COMPRESS_NO_TORCHVISION_HOOK=1`` turns it off; the line never
raises.
"""
from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "sapp_compress_torchvision.pth"
_LOADER = "\\n".join([
    "try:",
    " import importlib.util as u",
    " s = u.find_spec('sapp_compress')",
    " f = os.path.join(list(s.submodule_search_locations)[0], 'io', 'torchvision_compat.py')",
    " m = u.module_from_spec(u.spec_from_file_location('_sapp_compress_torchvision', f))",
    " m.__spec__.loader.exec_module(m)",
    " m.install_import_hook()",
    "except Exception:",
    " pass",
])
PTH = (f'import os; exec("{_LOADER}") '
       f'if not os.environ.get("SAPP_COMPRESS_NO_TORCHVISION_HOOK") else None\n')


class BuildPyWithPth(build_py):
    """build_py that also writes the start-up file at the root of a regular wheel."""

    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):
            Path(self.build_lib, PTH_NAME).write_text(PTH)


cmdclass = {"build_py": BuildPyWithPth}

try:
    from setuptools.command.editable_wheel import editable_wheel
except ImportError:  # a setuptools without PEP 660 editable installs
    editable_wheel = None

if editable_wheel is not None and hasattr(editable_wheel, "_select_strategy"):
    class EditableWheelWithPth(editable_wheel):
        """editable_wheel whose wheel also holds the start-up file (setuptools writes the editable wheel's own
        ``.pth`` from a strategy object; this one writes ours beside it)."""

        def _select_strategy(self, *args, **kwargs):
            return _WithPth(super()._select_strategy(*args, **kwargs))

    class _WithPth:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, wheel, files, mapping):
            self.inner(wheel, files, mapping)
            wheel.writestr(PTH_NAME, PTH.encode())

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

    cmdclass["editable_wheel"] = EditableWheelWithPth

setup(cmdclass=cmdclass)
