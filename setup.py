"""Build hook: with PICO_COMPILE=1, the hot modules are compiled with mypyc.

The package is pure Python and works as it is (`pip install .` needs no compiler). Compiled,
the modules on the data path run about a third faster (see DESIGN.md §7): they are the same
sources, type-checked by mypy --strict, turned into C extensions that Python imports in place
of the .py files. Everything else is declared in pyproject.toml.

    pip install mypy setuptools                         # a compiled install (needs a C compiler)
    PICO_COMPILE=1 pip install --no-build-isolation .
    PICO_COMPILE=1 python setup.py build_ext --inplace  # compiled modules beside the sources

Editable installs (`pip install -e .`) stay pure so an edited .py file is what runs.
"""

from __future__ import annotations

import os
import runpy
from pathlib import Path

from setuptools import setup

# The list lives in the package, which reports at run time whether it is compiled.
MODULES = runpy.run_path(str(Path(__file__).parent / "src/pico/native.py"))["MODULES"]


def ext_modules() -> list[object]:
    mode = os.environ.get("PICO_COMPILE", "0")
    if mode == "0":
        return []
    if mode != "1":
        raise SystemExit(f"PICO_COMPILE must be 0 or 1, not {mode!r}")
    try:
        from mypyc.build import mypycify
    except ImportError:
        raise SystemExit(
            "PICO_COMPILE=1 needs mypy (which brings mypyc) where the package is built: "
            "pip install mypy setuptools, then pip install --no-build-isolation ."
        ) from None

    return list(mypycify([f"src/{m.replace('.', '/')}.py" for m in MODULES], opt_level="3"))


setup(ext_modules=ext_modules())
