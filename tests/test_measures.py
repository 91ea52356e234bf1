"""A measure is one file: its scorer owns its tables. The run and `wsol-bench-report` build
every table by asking the registered scorers, so a measure added in one file (here a toy
installed as a plugin) and Chefer et al.'s segmentation scores reach `table.csv`, the
paper-layout tables, the printed tables and `--check` with no code of theirs in the report."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_module

from wsol_bench.cli.report import main as report_main
from wsol_bench.errors import SettingError
from wsol_bench.registry import Registry
from wsol_bench.run.run_tables import check_run
from wsol_bench.run.runner import run
from wsol_bench.run.scorers import SCORERS

TINY = ["dataset.params.num_images=6", "batch_size=3", "gallery_images=0", "progress=false",
        "metric.image_filter=all", "method=[rollout,random]", "run_name=test"]

# The whole toy measure: the share of images whose predicted class is the label, per method.
TOY = textwrap.dedent('''
    """Toy measure: classification accuracy per method, in one file."""
    from pathlib import Path

    import pandas as pd

    from wsol_bench.run.scorers import MeasureTables, Scorer

    FILE = "toy.csv"


    class ToyAccuracy(Scorer):
        def __init__(self, out_dir):
            self.counts = {}

        @classmethod
        def from_config(cls, cfg, context):
            return cls(context.out_dir)

        def update(self, mb):
            right, seen = self.counts.get(mb.method, (0, 0))
            self.counts[mb.method] = (right + int((mb.predictions == mb.labels).sum()), seen + len(mb.samples))

        def compute(self):
            return pd.DataFrame([{"method": m, "right": r, "images": n} for m, (r, n) in self.counts.items()])

        def write(self, out_dir):
            self.compute().to_csv(out_dir / FILE, index=False)
            return [out_dir / FILE]

        @classmethod
        def tables(cls, run):
            if not (run.path / FILE).is_file():
                return None
            rows = pd.read_csv(run.path / FILE).set_index("method")
            summary = pd.DataFrame({"Toy Acc": 100 * rows["right"] / rows["images"], "n_images_toy": rows["images"]})
            return MeasureTables(summary=summary, caption="Toy Acc: top-1 accuracy, percent (n_images_toy).",
                                 notes=["toy note"], files={"toy_summary": summary.reset_index()})
''')


@pytest.fixture
def toy_installed(tmp_path, monkeypatch):
    """The toy measure as an installed distribution advertising it in `wsol_bench.measures`;
    the scorer registry as a new process has it (plugins not loaded yet), restored afterwards."""
    plugin = tmp_path / "plugin"
    (plugin / "toy_measure_plugin").mkdir(parents=True)
    (plugin / "toy_measure_plugin" / "__init__.py").write_text(TOY)
    info = plugin / "toy_measure_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-measure-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[wsol_bench.measures]\ntoy = toy_measure_plugin:ToyAccuracy\n")
    monkeypatch.syspath_prepend(str(plugin))
    monkeypatch.setattr(SCORERS, "plugins_loaded", False)
    yield
    SCORERS.pop("toy", None)
    SCORERS.from_plugins.discard("toy")


def run_folder(out: Path, *overrides: str) -> Path:
    with initialize_config_module(config_module="wsol_bench.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*TINY, f"store.root={out.parent / 'cache'}", *overrides])
    run(cfg, out)
    return out


def test_a_measure_in_one_file_reaches_every_table_and_the_report(toy_installed, tmp_path, capsys):
    out = run_folder(tmp_path / "run")
    records = pd.read_csv(out / "records.csv").drop_duplicates(["image_id", "method"])
    expected = (records["prediction"] == records["label"]).groupby(records["method"], sort=False).mean() * 100
    table = pd.read_csv(out / "table.csv")
    assert table.groupby("method", sort=False)["Toy Acc"].first().to_dict() == pytest.approx(expected.to_dict())
    assert set(table["n_images_toy"]) == {6}
    box = pd.read_csv(out / "table_box.csv")
    assert box["Toy Acc"].tolist() == pytest.approx(expected.tolist())
    assert "Toy Acc: top-1 accuracy" in (out / "table_box.md").read_text()
    assert pd.read_csv(out / "toy_summary.csv")["method"].tolist() == ["rollout", "random"]
    printed = capsys.readouterr().out
    assert "Toy Acc" in printed and "toy note" in printed
    assert check_run(out) == []
    assert report_main([str(out), "--out", str(tmp_path / "report"), "--no-gallery"]) == 0
    assert "Toy Acc: top-1 accuracy" in capsys.readouterr().out
    assert (tmp_path / "report" / "toy_summary.csv").read_bytes() == (out / "toy_summary.csv").read_bytes()
    summary = pd.read_csv(out / "toy_summary.csv")
    summary.loc[0, "Toy Acc"] += 1
    summary.to_csv(out / "toy_summary.csv", index=False)
    assert check_run(out) == [(f"toy_summary.csv: row 0 (rollout), Toy Acc: rebuilt {expected.iloc[0]}, "
                               f"on disk {expected.iloc[0] + 1}")]


@pytest.fixture(scope="module")
def segmentation_run(tmp_path_factory) -> Path:
    return run_folder(tmp_path_factory.mktemp("seg") / "run", "segmentation=chefer")


def test_segmentation_joins_table_csv_the_paper_tables_and_the_check(segmentation_run, tmp_path, capsys):
    out = Path(shutil.copytree(segmentation_run, tmp_path / "copy"))
    scores = pd.read_csv(out / "segmentation.csv").set_index("method")
    table = pd.read_csv(out / "table.csv").groupby("method", sort=False).first()
    for column, name in (("pixel_accuracy", "Seg Pixel Acc"), ("mIoU", "Seg mIoU"), ("mAP", "Seg mAP")):
        assert table[name].to_dict() == pytest.approx(scores[column].to_dict()), name
    assert table["n_images_seg"].tolist() == [6, 6]
    for variant in ("box", "mask"):
        paper = pd.read_csv(out / f"table_{variant}.csv").set_index("method")
        assert paper["Seg mIoU"].to_dict() == pytest.approx(scores["mIoU"].to_dict())
        assert "Chefer et al.'s segmentation scores" in (out / f"table_{variant}.md").read_text()
    assert report_main([str(out), "--check"]) == 0
    assert report_main([str(out), "--no-gallery"]) == 0
    assert "Seg mIoU" in capsys.readouterr().out
    scores.loc["random", "mIoU"] = 0.0
    scores.reset_index().to_csv(out / "segmentation.csv", index=False)
    lines = check_run(out)
    assert len(lines) == 1 and lines[0].startswith("segmentation.csv: row 1 (random), mIoU: rebuilt")
    (out / "segmentation.csv").unlink()
    assert check_run(out) == [f"{out / 'segmentation.csv'} is missing"]


def test_the_suites_registries_share_one_helper():
    """Explainers, datasets and scorers are `Registry` objects: one way to register, list and
    refuse an unknown name."""
    from wsol_bench.datasets import registry as datasets
    from wsol_bench.methods import registry as methods

    for registry in (methods._REGISTRY, datasets._BUILDERS, SCORERS):
        assert isinstance(registry, Registry)
    with pytest.raises(SettingError, match="unknown dataset 'imagenett'; valid: cub, imagenet"):
        datasets.build_dataset("imagenett")
    with pytest.raises(SettingError, match="scorer name 'records' is already registered"):
        SCORERS.register("records")(type("Other", (), {}))
    assert list(SCORERS)[:5] == ["records", "faithfulness", "masks", "sweep", "segmentation"]


def test_chefer_perturbation_rows_tables_cache_and_class_setting(tmp_path, capsys):
    """faithfulness=chefer_perturbation scores the run's own (predicted-class) maps with no
    ground-truth-class pass; its table columns are the means of its rows in percent; a second
    run over the same store reads the cached rows; vis_class=predicted with target=label is
    refused before any work."""
    out = run_folder(tmp_path / "run", "faithfulness=chefer_perturbation", "faithfulness.test=both")
    assert set(json_of(out / "run.json")["shards_explained"]) == {"predicted/rollout", "predicted/random"}
    rows = pd.read_csv(out / "chefer_perturbation.csv")
    assert len(rows) == 12 and rows["target"].tolist() == rows["prediction"].tolist()
    assert ((rows["auc_positive"] >= 0) & (rows["auc_positive"] <= 1)).all()
    table = pd.read_csv(out / "table.csv").groupby("method", sort=False).first()
    means = rows.groupby("method", sort=False)[["auc_positive", "auc_negative"]].mean() * 100
    assert table["Pos. Perturbation"].to_dict() == pytest.approx(means["auc_positive"].to_dict())
    assert table["Neg. Perturbation"].to_dict() == pytest.approx(means["auc_negative"].to_dict())
    assert "Chefer et al.'s perturbation test" in (out / "table_box.md").read_text()
    assert check_run(out) == []
    cached = sorted((out.parent / "cache").rglob("chefer_perturbation_*/shard_*.csv"))
    assert len(cached) == 2  # one shard per method
    marked = pd.read_csv(cached[0]).assign(auc_positive=0.125)  # read back, not recomputed, by the next run
    marked.to_csv(cached[0], index=False)
    again = pd.read_csv(run_folder(tmp_path / "again", "faithfulness=chefer_perturbation",
                                   "faithfulness.test=both") / "chefer_perturbation.csv")
    assert (again["auc_positive"] == 0.125).sum() == 6
    pd.testing.assert_frame_equal(again.drop(columns="auc_positive"), rows.drop(columns="auc_positive"))
    with pytest.raises(SettingError, match="vis_class=predicted scores the maps of the predicted class"):
        run_folder(tmp_path / "label", "faithfulness=chefer_perturbation", "target=label")


def json_of(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


@pytest.mark.parametrize(("mode", "column", "name"), [("deletion", "auc_deletion", "Deletion AUC"),
                                                      ("insertion", "auc_insertion", "Insertion AUC")])
def test_deletion_and_insertion_runs_reach_the_tables(tmp_path, mode, column, name):
    """A RISE curve's rows have no ABPC: its own AUC column and count reach the tables."""
    out = run_folder(tmp_path / "run", f"faithfulness={mode}", "faithfulness.steps=3")
    rows = pd.read_csv(out / "faithfulness.csv")
    box = pd.read_csv(out / "table_box.csv").set_index("method")
    assert box[name].to_dict() == pytest.approx((rows.groupby("method")[column].mean() * 100).to_dict())
    assert box[f"n_images_{mode}"].tolist() == [6, 6] and "ABPC" not in box.columns
    assert check_run(out) == []


@pytest.mark.parametrize(("mode", "settings", "means"), [
    ("road", ["faithfulness.percentiles=[50,80]"], {"road_morf": "ROAD MoRF", "road_lerf": "ROAD LeRF",
                                                    "road_combined": "ROAD"}),
    ("saco", ["faithfulness.num_subsets=4"], {"saco": "SaCo"}),
])
def test_road_and_saco_rows_reach_the_tables(tmp_path, mode, settings, means):
    """ROAD and SaCo score the run's own maps (no ground-truth-class pass); the table columns
    are the means of the rows (ROAD in percent, SaCo as it is)."""
    out = run_folder(tmp_path / "run", f"faithfulness={mode}", *settings)
    assert set(json_of(out / "run.json")["shards_explained"]) == {"predicted/rollout", "predicted/random"}
    rows = pd.read_csv(out / f"{mode}.csv")
    assert len(rows) == 12 and rows["target"].tolist() == rows["prediction"].tolist()
    box = pd.read_csv(out / "table_box.csv").set_index("method")
    scale = 1 if mode == "saco" else 100
    for column, name in means.items():
        assert box[name].to_dict() == pytest.approx((rows.groupby("method")[column].mean() * scale).to_dict()), name
    assert check_run(out) == []
