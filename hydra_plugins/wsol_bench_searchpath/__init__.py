"""Hydra search path plugin of wsol-bench: the config folders of installed explainer plugins.

Hydra discovers it in the `hydra_plugins` namespace package. For every distribution that
advertises an explainer in the entry-point group `wsol_bench.explainers` and ships a `conf`
package beside the entry point's module (`token_norm = "token_norm_plugin:TokenNorm"` ->
`token_norm_plugin.conf`), `pkg://<package>.conf` joins the search path of the wsol-bench
commands, so `wsol-bench method=[agcam,token_norm]` needs no `hydra.searchpath` flag.

This module is imported by every Hydra application in the environment, so it imports nothing of
wsol-bench (torch) and only changes the search path of applications that read wsol-bench's
config tree. A plugin whose config package cannot be imported is skipped: Hydra would
otherwise fail on it at every lookup; the explainer registry reports the plugin by name
when its method is used.
"""

from __future__ import annotations

import importlib
import importlib.util
from importlib.metadata import entry_points

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

ENTRY_POINT_GROUP = "wsol_bench.explainers"  # = wsol_bench.methods.registry.ENTRY_POINT_GROUP
WSOL_BENCH_CONFIG = "pkg://wsol_bench.conf"
PROVIDER = "wsol-bench-plugin"


def conf_package(module: str) -> str | None:
    """`<package>.conf` beside the entry point's `module` (inside it when it is a package), if
    that config package imports; None otherwise (no such package, or a broken plugin)."""
    try:
        spec = importlib.util.find_spec(module)
        if spec is None:
            return None
        package = module if spec.submodule_search_locations is not None else module.rpartition(".")[0]
        if not package:
            return None
        name = f"{package}.conf"
        importlib.import_module(name)
        return name
    except Exception:  # any failure of a third-party package must not stop the command  # noqa: BLE001
        return None


def plugin_config_paths() -> list[str]:
    """`pkg://` search path entries of every explainer plugin's config package, in entry point
    order, without repeats."""
    paths: list[str] = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        name = conf_package(ep.module)
        if name is not None and f"pkg://{name}" not in paths:
            paths.append(f"pkg://{name}")
    return paths


class WsolBenchSearchPathPlugin(SearchPathPlugin):
    """Appends the explainer plugins' config packages after wsol-bench's own config tree (whose
    configs win on a name clash)."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        """Add the plugins' config packages when the application reads wsol-bench's tree."""
        if not any(element.path == WSOL_BENCH_CONFIG for element in search_path.get_path()):
            return
        for path in plugin_config_paths():
            search_path.append(provider=PROVIDER, path=path)
