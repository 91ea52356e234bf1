"""Third-party explainers: an installed package advertising an entry point in the group
`wsol_bench.explainers` appears in available(), runs through get_explainer and the CLI."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import make_vit

from wsol_bench.methods import registry

PLUGIN = textwrap.dedent('''
    """An example third-party explainer: the L2 norm of each patch token's embedding."""
    import torch
    from wsol_bench.methods import Explainer

    class TokenNorm(Explainer):
        class_specific = False

        def __init__(self, model, power: float = 1.0):
            super().__init__(model)
            self.power = power

        @torch.no_grad()
        def explain(self, images, targets):
            tokens = self.model.forward_features(images)
            logits = self.model.forward_head(tokens)
            used = self.resolve_targets(logits, targets)
            return self.patch_map(tokens.norm(dim=-1) ** self.power), logits, used
''')

YAML = textwrap.dedent('''
    # @package method.token_norm
    name: token_norm
    params:
      power: 2.0
''').lstrip()


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Path:
    """A fake installed distribution: module, config folder and dist-info entry point."""
    (tmp_path / "token_norm_plugin").mkdir()
    (tmp_path / "token_norm_plugin" / "__init__.py").write_text(PLUGIN)
    conf = tmp_path / "token_norm_plugin" / "conf" / "method"
    conf.mkdir(parents=True)
    (tmp_path / "token_norm_plugin" / "conf" / "__init__.py").write_text("")
    (conf / "token_norm.yaml").write_text(YAML)
    info = tmp_path / "token_norm_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: token-norm-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[wsol_bench.explainers]\ntoken_norm = token_norm_plugin:TokenNorm\n")
    return tmp_path


def test_entry_point_explainer_is_registered(plugin_dir, monkeypatch):
    """After installation the plugin is listed and built like a built-in method."""
    monkeypatch.syspath_prepend(str(plugin_dir))
    monkeypatch.setattr(registry, "_REGISTRY", registry._REGISTRY.fresh())
    registry.load_plugins()
    assert "token_norm" in registry.available()
    model = make_vit()
    explanation = registry.get_explainer("token_norm", model, power=2.0)(torch.randn(2, 3, 32, 32))
    assert explanation.maps.shape == (2, 4, 4) and not explanation.class_specific


def test_broken_plugin_names_itself(tmp_path, monkeypatch):
    """A plugin that fails to import is reported by name, not as a bare traceback elsewhere."""
    info = tmp_path / "bad_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bad-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[wsol_bench.explainers]\nbad = no_such_module:Nope\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_REGISTRY", registry._REGISTRY.fresh())
    registry.load_plugins()  # other methods keep working
    assert "agcam" in registry.available() and "bad" not in registry.available()
    with pytest.raises(ImportError, match="plugin 'bad'.*no_such_module"):
        registry.explainer_class("bad")


def add_distribution(root: Path, name: str, entry_point: str) -> None:
    """A dist-info folder under `root` advertising `entry_point` as explainer `name`."""
    info = root / f"{name}_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[wsol_bench.explainers]\n{name} = {entry_point}\n")


@pytest.fixture
def broken_plugins(plugin_dir: Path) -> Path:
    """Beside the good plugin: an entry point whose module does not exist, a package without a
    conf folder, and one whose conf package fails to import."""
    add_distribution(plugin_dir, "missing", "no_such_module:Nope")
    (plugin_dir / "noconf_plugin").mkdir()
    (plugin_dir / "noconf_plugin" / "__init__.py").write_text("class Nope:\n    pass\n")
    add_distribution(plugin_dir, "noconf", "noconf_plugin:Nope")
    (plugin_dir / "badconf_plugin" / "conf").mkdir(parents=True)
    (plugin_dir / "badconf_plugin" / "__init__.py").write_text("class Nope:\n    pass\n")
    (plugin_dir / "badconf_plugin" / "conf" / "__init__.py").write_text("raise RuntimeError('broken')\n")
    add_distribution(plugin_dir, "badconf", "badconf_plugin:Nope")
    return plugin_dir


@pytest.fixture
def forget_plugin_modules():
    """Drop the modules a test imported from its plugin folder, which is gone afterwards."""
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.split(".")[0].endswith("_plugin"):
            del sys.modules[name]


def test_hydra_discovers_the_search_path_plugin():
    """The plugin is installed in the hydra_plugins namespace package, where Hydra looks."""
    from hydra.core.plugins import Plugins
    from hydra.plugins.search_path_plugin import SearchPathPlugin

    from hydra_plugins.wsol_bench_searchpath import ENTRY_POINT_GROUP

    # Hydra executes the plugin modules again when it scans them: compare by name
    found = [f"{c.__module__}.{c.__qualname__}" for c in Plugins.instance().discover(SearchPathPlugin)]
    assert "hydra_plugins.wsol_bench_searchpath.WsolBenchSearchPathPlugin" in found
    assert ENTRY_POINT_GROUP == registry.ENTRY_POINT_GROUP


def test_search_path_has_the_config_packages_of_working_plugins_only(broken_plugins, monkeypatch,
                                                                     forget_plugin_modules):
    """Broken plugins are skipped; applications other than wsol-bench's are left alone."""
    from hydra._internal.config_search_path_impl import ConfigSearchPathImpl

    from hydra_plugins.wsol_bench_searchpath import WsolBenchSearchPathPlugin, plugin_config_paths

    monkeypatch.syspath_prepend(str(broken_plugins))
    assert plugin_config_paths() == ["pkg://token_norm_plugin.conf"]
    ours, other = ConfigSearchPathImpl(), ConfigSearchPathImpl()
    ours.append("main", "pkg://wsol_bench.conf")
    other.append("main", "pkg://someone_else.conf")
    for path in (ours, other):
        WsolBenchSearchPathPlugin().manipulate_search_path(path)
    assert [e.path for e in ours.get_path()] == ["pkg://wsol_bench.conf", "pkg://token_norm_plugin.conf"]
    assert [e.path for e in other.get_path()] == ["pkg://someone_else.conf"]


def _builtin_methods(plus: list[str]) -> list[str]:
    """The method configs the package ships (conf/method/*.yaml) and the plugin's, sorted."""
    shipped = [p.stem for p in (Path(__file__).parents[1] / "conf" / "method").glob("*.yaml")]
    assert {"agcam", "center", "generic_attention", "gradcam", "random", "rollout"} <= set(shipped)
    return sorted(shipped + plus)


@pytest.fixture
def installed(monkeypatch, forget_plugin_modules):
    """`installed(folder)`: the distributions in `folder` are installed, and the explainer
    registry is as a new process has it (no plugin loaded yet), so the command in this process
    finds them by itself as `wsol-bench` started with `folder` on PYTHONPATH does."""
    monkeypatch.setattr(registry, "_REGISTRY", registry._REGISTRY.fresh())
    return lambda folder: monkeypatch.syspath_prepend(str(folder))


def test_broken_plugins_do_not_break_the_cli(broken_plugins, tmp_path, installed, command):
    """--help still works and lists the working plugin's method config."""
    installed(broken_plugins)
    proc = command("wsol-bench", ["--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"method: {', '.join(_builtin_methods(['token_norm']))}" in proc.stdout


@pytest.mark.parametrize("searchpath", [[], ["hydra.searchpath=[pkg://token_norm_plugin.conf]"]],
                         ids=["discovered", "hydra.searchpath"])
def test_plugin_runs_in_the_cli_and_tables(plugin_dir, tmp_path, searchpath, installed, command):
    """The CLI finds the plugin's YAML by itself (the search path plugin), or through the
    hydra.searchpath flag as before, and puts the method in the table."""
    installed(plugin_dir)
    proc = command("wsol-bench", ["method=[center,token_norm]", *searchpath, "dataset.params.num_images=8",
                                  "progress=false", "hydra.run.dir=run"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(tmp_path / "run" / "table.csv")
    assert list(table["method"]) == ["center", "token_norm"]
    assert "token_norm" in proc.stdout


def test_unknown_method_lists_plugin_methods(plugin_dir, tmp_path, installed, command):
    """The one-line error for an unknown method lists the plugin's method too."""
    installed(plugin_dir)
    proc = command("wsol-bench", ["method=[center,token_nrom]"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("wsol-bench: error: unknown method 'token_nrom'; valid: "
                                   f"{', '.join(_builtin_methods(['token_norm']))}")
