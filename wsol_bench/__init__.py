"""wsol-bench: explain Vision Transformers and score the explanations as weakly-supervised
object localization and faithfulness."""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"
# Importing the package stays light (no torch, no timm), so the commands answer --help and refuse
# bad settings at once; `import wsol_bench.models` registers the shipped model with timm.

_PACKAGE = Path(__file__).resolve().parent
# Subpackages that an install places inside wsol_bench but that a source checkout keeps at its
# top level (pyproject's package-dir mapping). Python started from the checkout's root imports
# this folder rather than the installed package, so without help `wsol_bench.methods` would
# not be found there.
_TOP_LEVEL = ("methods", "datasets", "conf")


class _CheckoutLayout(importlib.abc.MetaPathFinder):
    """Finds wsol_bench.methods, .datasets and .conf at the top level of a source checkout."""

    def find_spec(self, fullname, path=None, target=None):
        parent, _, name = fullname.rpartition(".")
        if parent != __name__ or name not in _TOP_LEVEL:
            return None
        folder = _PACKAGE.parent / name
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


if not (_PACKAGE / "methods").is_dir() and (_PACKAGE.parent / "methods" / "__init__.py").is_file():
    sys.meta_path.append(_CheckoutLayout())


# The Python API (wsol_bench.api) at the top, as `wsol_bench.explain(...)`: imported on first
# use, since it needs torch and the package itself must stay light.
_API_NAMES = ("Explained", "ImageLocalization", "as_frame", "explain", "localize", "overlay")


def __getattr__(name: str):
    """`wsol_bench.explain`, `.overlay`, `.localize` and the rest of `wsol_bench.api`, loaded lazily."""
    if name in _API_NAMES:
        from wsol_bench import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The package's names, the lazily loaded API's included."""
    return sorted([*globals(), *_API_NAMES])
