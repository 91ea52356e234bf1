"""Third-party explainers: an installed package advertising an entry point in the group
`wsol_bench.explainers` appears in available(), runs through get_explainer and the CLI.

The working plugin is the documented example, tests/data/plugin_token_norm/, built and installed
by pip as a user installs it; the broken ones are hand-written distributions (dist-info folders)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import REPO, make_vit

from wsol_bench.methods import registry

PLUGIN_SOURCE = Path(__file__).parent / "data" / "plugin_token_norm"
RECIPE_HEADING = "Adding your own explainer (plugin)"
# The plugin's files the recipe in the documentation shows, by the language of their code block.
RECIPE_FILES = {"python": "token_norm_plugin/__init__.py", "yaml": "token_norm_plugin/conf/method/token_norm.yaml",
                "toml": "pyproject.toml"}


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """The example plugin installed by `pip install` (a wheel built by setuptools, no network)
    into a folder of its own, as site-packages holds it: put the folder on sys.path to use it."""
    source = tmp_path_factory.mktemp("plugin") / PLUGIN_SOURCE.name
    # a copy: setuptools builds in the source tree (build/, *.egg-info), which parallel test
    # processes must not share and the repository must not collect
    shutil.copytree(PLUGIN_SOURCE, source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    site = tmp_path_factory.mktemp("plugin_site")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-build-isolation",
                           "--quiet", "--target", str(site), str(source)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return site


def plugin_recipe_blocks() -> tuple[Path, list[tuple[str, str]]]:
    """The document holding the plugin recipe (README.md or a page of docs/) and (language,
    text) of every fenced code block of that section, up to the next heading of its level or
    above (lines inside code blocks are never headings: a YAML comment starts with '#')."""
    for document in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        blocks: list[tuple[str, str]] = []
        level, fence, body = None, None, []
        for line in document.read_text(encoding="utf-8").splitlines(keepends=True):
            if fence is not None:  # inside a code block
                if line.rstrip() == "```":
                    blocks.append((fence, "".join(body)))
                    fence, body = None, []
                else:
                    body.append(line)
                continue
            heading = re.match(r"(#+) (.*)", line)
            if heading and heading.group(2).strip() == RECIPE_HEADING:
                level = len(heading.group(1))
            elif heading and level is not None and len(heading.group(1)) <= level:
                break
            elif level is not None and line.startswith("```"):
                fence = line[3:].strip()
        if level is not None:
            return document, blocks
    pytest.fail(f"no section '{RECIPE_HEADING}' in README.md or docs/*.md")


def test_documented_recipe_shows_the_plugin_files_as_they_are():
    """The documented plugin recipe is the tested package: its python, YAML and pyproject blocks
    equal tests/data/plugin_token_norm's files, character for character."""
    document, blocks = plugin_recipe_blocks()
    languages = [language for language, _ in blocks]
    for language, path in RECIPE_FILES.items():
        assert languages.count(language) == 1, f"{document.name}'s plugin recipe needs one {language} block ({path})"
        shown = next(text for lang, text in blocks if lang == language)
        assert shown == (PLUGIN_SOURCE / path).read_text(encoding="utf-8"), \
            f"{document.name}'s {language} block differs from {PLUGIN_SOURCE.name}/{path}"


def test_entry_point_explainer_is_registered(plugin_site, monkeypatch, forget_plugin_modules):
    """After installation the plugin is listed and built like a built-in method."""
    monkeypatch.syspath_prepend(str(plugin_site))
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
def broken_plugins(tmp_path: Path) -> Path:
    """Distributions to install beside the good plugin: an entry point whose module does not
    exist, a package without a conf folder, and one whose conf package fails to import."""
    folder = tmp_path / "broken"
    folder.mkdir()
    add_distribution(folder, "missing", "no_such_module:Nope")
    (folder / "noconf_plugin").mkdir()
    (folder / "noconf_plugin" / "__init__.py").write_text("class Nope:\n    pass\n")
    add_distribution(folder, "noconf", "noconf_plugin:Nope")
    (folder / "badconf_plugin" / "conf").mkdir(parents=True)
    (folder / "badconf_plugin" / "__init__.py").write_text("class Nope:\n    pass\n")
    (folder / "badconf_plugin" / "conf" / "__init__.py").write_text("raise RuntimeError('broken')\n")
    add_distribution(folder, "badconf", "badconf_plugin:Nope")
    return folder


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


def test_search_path_has_the_config_packages_of_working_plugins_only(plugin_site, broken_plugins, monkeypatch,
                                                                     forget_plugin_modules):
    """Broken plugins are skipped; applications other than wsol-bench's are left alone."""
    from hydra._internal.config_search_path_impl import ConfigSearchPathImpl

    from hydra_plugins.wsol_bench_searchpath import WsolBenchSearchPathPlugin, plugin_config_paths

    monkeypatch.syspath_prepend(str(plugin_site))
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


def test_broken_plugins_do_not_break_the_cli(plugin_site, broken_plugins, tmp_path, installed, command):
    """--help still works and lists the working plugin's method config."""
    installed(plugin_site)
    installed(broken_plugins)
    proc = command("wsol-bench", ["--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"method: {', '.join(_builtin_methods(['token_norm']))}" in proc.stdout


@pytest.mark.parametrize("searchpath", [[], ["hydra.searchpath=[pkg://token_norm_plugin.conf]"]],
                         ids=["discovered", "hydra.searchpath"])
def test_pip_installed_plugin_runs_in_the_cli_and_tables(plugin_site, tmp_path, searchpath, installed, command):
    """After `pip install` of the plugin the CLI finds its YAML by itself (the search path
    plugin), or through the hydra.searchpath flag, and puts the method in the table: the wheel
    must carry conf/method/token_norm.yaml, not only the Python module."""
    installed(plugin_site)
    proc = command("wsol-bench", ["method=[agcam,token_norm]", *searchpath, "dataset.params.num_images=4",
                                  "progress=false", "hydra.run.dir=run"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(tmp_path / "run" / "table.csv")
    assert list(table["method"]) == ["agcam", "token_norm"]
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["method"]["token_norm"]["params"] == {"power": 2.0}  # the plugin's YAML, not defaults


def test_unknown_method_lists_plugin_methods(plugin_site, tmp_path, installed, command):
    """The one-line error for an unknown method lists the plugin's method too."""
    installed(plugin_site)
    proc = command("wsol-bench", ["method=[center,token_nrom]"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("wsol-bench: error: unknown method 'token_nrom'; valid: "
                                   f"{', '.join(_builtin_methods(['token_norm']))}")
