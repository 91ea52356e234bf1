"""Third-party explainers: an installed package advertising an entry point in the group
`wsol_bench.explainers` appears in available(), runs through get_explainer and the CLI."""

from __future__ import annotations

import os
import subprocess
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
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.load_plugins(force=True)
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
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    with pytest.raises(ImportError, match="plugin 'bad'"):
        registry.load_plugins(force=True)


def test_plugin_runs_in_the_cli_and_tables(plugin_dir, tmp_path):
    """The CLI finds the plugin's YAML through hydra.searchpath and puts it in the table."""
    env = {**os.environ, "PYTHONPATH": str(plugin_dir)}
    script = Path(sys.executable).parent / "wsol-bench"
    proc = subprocess.run(
        [str(script), "method=[center,token_norm]", "hydra.searchpath=[pkg://token_norm_plugin.conf]",
         "dataset.params.num_images=8", "progress=false", "hydra.run.dir=run"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(tmp_path / "run" / "table.csv")
    assert list(table["method"]) == ["center", "token_norm"]
    assert "token_norm" in proc.stdout
