"""Package discovery for the checkout's layout; every other setting is in pyproject.toml.

`methods/`, `datasets/` and `conf/` sit at the top level of the checkout but install inside the
package, as `wsol_bench.methods`, `wsol_bench.datasets` and `wsol_bench.conf` (so the suite never
shadows the Hugging Face `datasets` package). pyproject.toml cannot discover packages under such
a mapping, so they are found here: every folder below each root is a package (namespace packages
included, so a subfolder without `__init__.py` is shipped too), and nothing has to be listed by hand.
"""

from setuptools import find_namespace_packages, setup

# installed package -> its folder in the checkout
ROOTS = {
    "wsol_bench": "wsol_bench",
    "wsol_bench.methods": "methods",
    "wsol_bench.datasets": "datasets",
    "wsol_bench.conf": "conf",
    # Hydra finds search path plugins in the hydra_plugins namespace package (no __init__.py)
    "hydra_plugins": "hydra_plugins",
}
# data files shipped beside the code: config tree, weights and their training record, the report's
# HTML templates
DATA = ["*.yaml", "*.safetensors", "*.json", "*.j2"]


def packages() -> list[str]:
    """Every package below the roots."""
    found = []
    for package, folder in ROOTS.items():
        found += [package] + [f"{package}.{sub}" for sub in find_namespace_packages(folder, exclude=["*__pycache__"])]
    return sorted(found)


PACKAGES = packages()
setup(package_dir=ROOTS, packages=PACKAGES, package_data={package: DATA for package in PACKAGES})
