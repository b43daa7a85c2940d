"""PEP 517 backend: setuptools, with the cffi extension from csrc/ added.

setuptools cannot take `cffi_modules` from pyproject.toml, and the project keeps no setup.py,
so this wraps the setup() call that setuptools' backend makes when no setup.py exists.
"""

from typing import Any

import setuptools
from setuptools.build_meta import *  # noqa: F403  (re-export the PEP 517 hooks)

_plain_setup = setuptools.setup


def _setup_with_cffi(**attrs: Any) -> Any:
    attrs.setdefault("cffi_modules", ["csrc/build_ffi.py:ffibuilder"])
    return _plain_setup(**attrs)


setuptools.setup = _setup_with_cffi
