"""Sparseness (Gini index) and complexity (entropy) of the maps: hand-computed cases, batched
equal to one map at a time, equal to Quantus per image on the same maps, and the `measure`
group: a run's rows, table columns, report and refusals."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_module

from wsol_bench.errors import SettingError
from wsol_bench.metrics.complexity import contribution_entropy, gini_index
from wsol_bench.run.run_tables import check_run
from wsol_bench.run.runner import run

TINY = ["dataset.params.num_images=6", "batch_size=3", "gallery_images=0", "progress=false",
        "metric.image_filter=all", "method=[rollout,random,center]", "run_name=test"]


def run_folder(out: Path, *overrides: str) -> Path:
    with initialize_config_module(config_module="wsol_bench.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*TINY, f"store.root={out.parent / 'cache'}", *overrides])
    run(cfg, out)
    return out


def test_gini_index_by_hand():
    # [1, 2, 3, 4] sorted: (-3*1 - 1*2 + 1*3 + 3*4) / (4 * 10) = 0.25
    assert gini_index(torch.tensor([[[4.0, 1.0], [3.0, 2.0]]])).item() == pytest.approx(0.25, abs=1e-12)
    one_hot = torch.zeros(1, 5, 5)
    one_hot[0, 2, 3] = 0.7
    assert gini_index(one_hot).item() == pytest.approx(24 / 25, abs=1e-12)  # (N - 1) / N
    assert gini_index(torch.full((1, 3, 3), 0.4)).item() == pytest.approx(0.0, abs=1e-12)
    # the absolute values: a sign flip changes nothing; an all-zero map has no index
    assert gini_index(torch.tensor([[[-4.0, 1.0], [3.0, -2.0]]])).item() == pytest.approx(0.25, abs=1e-12)
    assert math.isnan(gini_index(torch.zeros(1, 2, 2)).item())


def test_contribution_entropy_by_hand():
    # p = [0.25, 0.25, 0.5, 0]: -(2 * 0.25 ln 0.25 + 0.5 ln 0.5), the zero contributes nothing
    expected = -(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5))
    assert contribution_entropy(torch.tensor([[[1.0, 1.0], [2.0, 0.0]]])).item() == pytest.approx(expected, abs=1e-12)
    assert contribution_entropy(torch.full((1, 4, 4), 0.3)).item() == pytest.approx(math.log(16), abs=1e-12)
    one_hot = torch.zeros(1, 4, 4)
    one_hot[0, 1, 1] = 1.0
    assert contribution_entropy(one_hot).item() == 0.0
    assert math.isnan(contribution_entropy(torch.zeros(1, 2, 2)).item())


def test_batched_equals_one_map_at_a_time():
    maps = torch.rand(5, 16, 16, generator=torch.Generator().manual_seed(0))
    for measure in (gini_index, contribution_entropy):
        whole = measure(maps)
        assert torch.equal(whole, torch.cat([measure(m[None]) for m in maps]))


def test_equal_to_quantus_per_map():
    """Quantus adds 1e-7 to every value before the Gini index and 1e-12 inside the logarithm;
    the papers do not, so the numbers agree to float noise (Quantus computes in float32)."""
    quantus = pytest.importorskip("quantus")
    rng = np.random.default_rng(1)
    heat = rng.random((4, 1, 32, 32)).astype(np.float32) ** 3  # skewed, as heatmaps are
    heat[0, 0, :16] = 0  # zero pixels (0 ln 0 = 0)
    x = rng.random((4, 3, 32, 32)).astype(np.float32)
    y = np.arange(4)
    options = {"disable_warnings": True, "display_progressbar": False, "abs": True, "normalise": False}
    ours = {"sparseness": gini_index(torch.from_numpy(heat[:, 0])).numpy(),
            "complexity": contribution_entropy(torch.from_numpy(heat[:, 0])).numpy()}
    theirs = {"sparseness": quantus.Sparseness(**options), "complexity": quantus.Complexity(**options)}
    for name, metric in theirs.items():
        values = np.asarray(metric(model=None, x_batch=x, y_batch=y, a_batch=heat.copy(), device="cpu"))
        np.testing.assert_allclose(values, ours[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_a_run_writes_rows_table_columns_and_a_checked_report(tmp_path):
    out = run_folder(tmp_path / "run", "measure=[sparseness,complexity]")
    table = pd.read_csv(out / "table.csv")
    for file, column, name in (("sparseness.csv", "sparseness", "Sparseness"),
                               ("complexity.csv", "complexity", "Complexity")):
        rows = pd.read_csv(out / file)
        assert len(rows) == 18 and set(rows["method"]) == {"rollout", "random", "center"}
        means = rows.groupby("method")[column].mean()
        assert table.groupby("method")[name].first().to_dict() == pytest.approx(means.to_dict())
        assert (table[f"n_images_{column}"] == 6).all()
    # the center baseline's map is one fixed Gaussian: the same number for every image
    center = pd.read_csv(out / "sparseness.csv").query("method == 'center'")["sparseness"]
    assert center.nunique() == 1 and 0 < center.iloc[0] < 1
    assert check_run(out) == []


def test_measure_entries_are_checked_before_any_model_pass(tmp_path):
    with pytest.raises(SettingError, match=r"measure.bogus: unknown measure 'nonesuch'; valid: .*sparseness"):
        run_folder(tmp_path / "a", "+measure.bogus={name:nonesuch}")
    with pytest.raises(SettingError, match=r"measure 'sparseness' takes no parameter 'window'; valid: none"):
        run_folder(tmp_path / "b", "measure=[sparseness]", "+measure.sparseness.params.window=3")
    with pytest.raises(SettingError, match=r"selected 2 times"):
        run_folder(tmp_path / "c", "measure=[sparseness]", "+measure.again={name:sparseness}")
    with pytest.raises(SettingError, match=r"measure.odd must be \{name: <measure>"):
        run_folder(tmp_path / "d", "+measure.odd=3")
