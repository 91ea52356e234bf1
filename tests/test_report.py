"""`wsol-bench-report` and the run-folder tables: rebuilt tables equal a real run's tables,
`--check` catches tampering, comparisons mark injected differences, published numbers appear
only for the paper's dataset and model, optional ABPC/wsolevaluation columns, combined tables
and the gallery rebuild."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from test_tables import assert_matches_csv, parse_latex, parse_markdown, records_frame

from wsol_bench.cli.report import compare_tables, config_differences, main, rebuild_gallery
from wsol_bench.errors import InputFileError, MissingInputError, SettingError, UserError
from wsol_bench.files import write_json
from wsol_bench.report.manifest import MANIFEST, IncompleteRun, manifest_payload
from wsol_bench.report.paper_numbers import AGCAM_PAPER, PAPER_MODEL
from wsol_bench.report.run_folder import read_run
from wsol_bench.report.table_format import latex_escape
from wsol_bench.run.run_tables import check_run, combined_table, run_tables, write_run_tables


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    """A real benchmark run: 8 synthetic images, AG-CAM and random, shipped model."""
    from wsol_bench.run.runner import run

    root = tmp_path_factory.mktemp("run")
    out = root / "run"
    overrides = ["method=[agcam,random]", "dataset.params.num_images=8", "batch_size=8", "gallery_images=2",
                 "progress=false", "run_name=test", f"store.root={root / 'cache'}"]
    with initialize_config_module(config_module="wsol_bench.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    run(cfg, out)
    return out


@pytest.fixture
def run_copy(real_run, tmp_path) -> Path:
    """A private copy of the real run to tamper with."""
    return Path(shutil.copytree(real_run, tmp_path / "copy"))


def hand_run(folder: Path, dataset: str, model: str, split: str = "val", **settings) -> Path:
    """A complete run folder with hand-made records (see test_tables.records_frame) and a config."""
    folder.mkdir(parents=True)
    config = {"dataset": {"name": dataset, "split": split}, "model": {"name": model}, "target": "predicted",
              "metric": {"image_filter": "correct", "thresholds": [0.5]}, **settings}
    OmegaConf.save(OmegaConf.create(config), folder / "config.yaml")
    records_frame().assign(dataset=dataset, split=split).to_csv(folder / "records.csv", index=False)
    return mark_complete(folder)


def mark_complete(folder: Path) -> Path:
    """Write the run.json a finished run writes, for a folder edited by a test."""
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST]
    write_json(folder / MANIFEST, manifest_payload(folder, files, {}))
    return folder


def test_rebuilt_tables_equal_the_runs_tables(real_run):
    """The table the run wrote equals the one rebuilt from its records, and so do the
    numbers of its Markdown and LaTeX paper tables."""
    tables = run_tables(real_run)
    on_disk = pd.read_csv(real_run / "table.csv")
    pd.testing.assert_frame_equal(tables["localization"].reset_index(), on_disk, check_dtype=False,
                                  check_exact=False, rtol=0, atol=1e-9)
    assert check_run(real_run) == [] and main([str(real_run), "--check"]) == 0
    for variant in ("box", "mask"):
        csv = tables[variant].copy()
        assert_matches_csv(parse_markdown((real_run / f"table_{variant}.md").read_text()), csv)
        assert_matches_csv(parse_latex((real_run / f"table_{variant}.tex").read_text()), csv)


def test_report_writes_tables_that_parse_back(real_run, tmp_path, capsys):
    """One run with --out: CSV, Markdown and LaTeX of each variant, printed with the note that
    nothing is published for the synthetic data."""
    assert main([str(real_run), "--out", str(tmp_path), "--no-gallery"]) == 0
    printed = capsys.readouterr().out
    assert "No published numbers for synthetic/val with wsol_synthetic_vit" in printed
    for variant in ("box", "mask"):
        csv = pd.read_csv(tmp_path / f"table_{variant}.csv")
        assert csv["method"].tolist() == ["agcam", "random"]
        assert_matches_csv(parse_markdown((tmp_path / f"table_{variant}.md").read_text()), csv)
        assert_matches_csv(parse_latex((tmp_path / f"table_{variant}.tex").read_text()), csv)
    assert "published" not in (tmp_path / "table_box.csv").read_text()


def test_check_fails_on_a_tampered_table(run_copy, capsys):
    table = pd.read_csv(run_copy / "table.csv")
    table.loc[0, "box_iou"] += 0.001
    table.to_csv(run_copy / "table.csv", index=False)
    assert main([str(run_copy), "--check"]) == 1
    assert "table.csv: row 0 (agcam), box_iou" in capsys.readouterr().out
    write_run_tables(run_copy)  # rebuild: agrees again, now with table_<variant>.csv too
    assert main([str(run_copy), "--check"]) == 0
    box = pd.read_csv(run_copy / "table_box.csv")
    box.loc[1, "Dice"] = 0.0
    box.to_csv(run_copy / "table_box.csv", index=False)
    rebuilt = run_tables(run_copy)["box"].loc[1, "Dice"]
    assert check_run(run_copy) == [f"table_box.csv: row 1 (random), Dice: rebuilt {rebuilt}, on disk 0.0"]


def test_comparison_marks_an_injected_difference(real_run, run_copy, tmp_path, capsys):
    """Run B = run A with agcam's box IoU raised by one point and another seed: only that
    cell is marked (* in text, bold in Markdown) and the seed is named as a config difference."""
    records = pd.read_csv(run_copy / "records.csv")
    records.loc[records["method"] == "agcam", "box_iou"] += 0.01
    records.to_csv(run_copy / "records.csv", index=False)
    config = OmegaConf.load(run_copy / "config.yaml")
    config.seed = 1
    OmegaConf.save(config, run_copy / "config.yaml")
    mark_complete(run_copy)
    out = tmp_path / "cmp"
    assert main([str(real_run), str(run_copy), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "config differs: seed: A=0, B=1" in printed
    md = parse_markdown((out / "comparison_box.md").read_text()).set_index("method")
    assert md.loc["agcam", "B-A: IoU"] == "**+1.00**"
    marked = [(m, c) for m in md.index for c in md.columns if "**" in md.loc[m, c]]
    assert marked == [("agcam", "B-A: IoU")]
    # each run's value with its own interval; the bounds are in the CSV
    b_value, _ = (float(part) for part in md.loc["agcam", "B: IoU"].split(" ± "))
    a_value, a_half = (float(part) for part in md.loc["agcam", "A: IoU"].split(" ± "))
    assert b_value == pytest.approx(a_value + 1, abs=0.011) and a_half > 0
    a_table = pd.read_csv(real_run / "table_box.csv").set_index("method")
    assert a_half == pytest.approx((a_table.loc["agcam", "IoU ci_hi"] - a_table.loc["agcam", "IoU ci_lo"]) / 2,
                                   abs=0.006)
    text_row = next(line for line in printed.splitlines() if line.startswith("agcam"))
    assert "+1.00*" in text_row and text_row.count("*") == 1
    csv = pd.read_csv(out / "comparison_box.csv")
    assert csv.loc[csv["method"] == "agcam", "B-A: IoU"].item() == pytest.approx(1.0)
    assert csv.loc[csv["method"] == "agcam", "A: IoU ci_lo"].item() == pytest.approx(a_table.loc["agcam", "IoU ci_lo"])
    assert "B-A: IoU ci_lo" not in csv  # a difference between runs has no interval
    # The mask table is unchanged: nothing is marked there.
    assert "**" not in (out / "comparison_mask.md").read_text().split("\n\n")[0]


def test_rows_in_one_run_only_are_flagged():
    a = pd.DataFrame({"method": ["agcam", "rollout"], "IoU": [10.0, 5.0]})
    b = pd.DataFrame({"method": ["agcam", "gradcam"], "IoU": [10.004, 7.0]})
    comparison = compare_tables([a, b], ["A", "B"], tolerance=0.01)
    assert comparison.values["method"].tolist() == ["agcam", "rollout", "gradcam"]
    assert comparison.flags["B-A: IoU"].tolist() == [False, True, True]
    assert comparison.values["B-A: IoU"].iloc[0] == pytest.approx(0.004)


def test_config_differences_name_keys_and_values():
    diff = config_differences([{"a": {"b": 1, "c": 2}, "d": [1]}, {"a": {"b": 1, "c": 3}, "e": 0}])
    assert diff == {"a.c": [2, 3], "d": [[1], "<absent>"], "e": ["<absent>", 0]}


def test_published_numbers_only_for_imagenet_with_the_paper_model(tmp_path):
    paper = hand_run(tmp_path / "paper", "imagenet", PAPER_MODEL)
    box = run_tables(paper)["box"]
    assert box["method"].tolist() == ["agcam", "agcam (published)", "rollout"]
    assert box.loc[1, ["Pixel Acc", "IoU", "Dice", "ABPC"]].tolist() == [73.41, 52.12, 65.15, 36.91]
    assert any(AGCAM_PAPER in note for note in box.attrs["notes"])
    write_run_tables(paper)
    md = (paper / "table_box.md").read_text()
    assert "| agcam (published)" in md and AGCAM_PAPER in md
    assert latex_escape(AGCAM_PAPER) in (paper / "table_box.tex").read_text()
    other_model = run_tables(hand_run(tmp_path / "augreg", "imagenet", "vit_base_patch16_224"))["box"]
    assert "agcam (published)" not in other_model["method"].tolist()
    assert other_model.attrs["notes"][0].startswith("No published numbers for imagenet/val")
    # Published rows beside a run with other settings say what differs.
    all_images = hand_run(tmp_path / "all", "imagenet", PAPER_MODEL, metric={"image_filter": "all",
                                                                             "thresholds": [0.5]})
    assert any("metric.image_filter=all (published: correct)" in n for n in run_tables(all_images)["box"].attrs["notes"])


def test_faithfulness_and_wsoleval_columns_come_from_their_files(run_copy):
    """ABPC is the mean over all images in faithfulness.csv (here 10 % for agcam, 0 for
    random); MaxBoxAccV2 is copied from wsoleval.csv."""
    ids = pd.read_csv(run_copy / "records.csv")["image_id"].unique()
    rows = [{"image_id": i, "dataset": "synthetic", "split": "val", "method": m, "auc_morf": 0.5 - d,
             "auc_lerf": 0.5 + d, "abpc": 2 * d} for m, d in (("agcam", 0.05), ("random", 0.0)) for i in ids]
    pd.DataFrame(rows).to_csv(run_copy / "faithfulness.csv", index=False)
    pd.DataFrame({"method": ["agcam", "random"], "dataset": "synthetic", "split": "val", "n_images": 8,
                  "maxboxacc_v2": [70.5, 20.25], "pxap": [60.0, 30.0]}).to_csv(run_copy / "wsoleval.csv", index=False)
    with pytest.raises(IncompleteRun, match="faithfulness.csv was added after the run finished"):
        run_tables(run_copy)
    box = run_tables(run_copy, allow_incomplete=True)["box"]
    assert box["ABPC"].tolist() == pytest.approx([10.0, 0.0])
    assert box["AUC LeRF"].tolist() == pytest.approx([55.0, 50.0])
    assert box["MaxBoxAccV2"].tolist() == [70.5, 20.25] and box["PxAP"].tolist() == [60.0, 30.0]
    assert box["n_images_abpc"].tolist() == [8, 8]
    assert "ABPC" in box.attrs["caption"] and box.attrs["notes"][1:] == []
    pd.DataFrame(rows[:3]).to_csv(run_copy / "faithfulness.csv", index=False)
    notes = run_tables(run_copy, allow_incomplete=True)["box"].attrs["notes"]
    assert "faithfulness.csv covers 3 of 8 images for agcam." in notes
    pd.DataFrame(rows).assign(dataset="imagenet").to_csv(run_copy / "faithfulness.csv", index=False)
    with pytest.raises(ValueError, match="faithfulness.csv holds rows of dataset"):
        run_tables(run_copy, allow_incomplete=True)


def test_combined_table_has_one_block_per_dataset(real_run, tmp_path, capsys):
    paper = hand_run(tmp_path / "paper", "imagenet", PAPER_MODEL)
    combined = combined_table([real_run, paper], "box")
    assert combined["dataset"].tolist() == ["synthetic/val"] * 2 + ["imagenet/val"] * 3
    assert combined.columns[0] == "dataset" and combined.columns[-1] == "filter"
    assert combined["method"].tolist() == ["agcam", "random", "agcam", "agcam (published)", "rollout"]
    out = tmp_path / "out"
    assert main([str(real_run), str(paper), "--combined", "--out", str(out)]) == 0
    assert (out / "combined_mask.csv").is_file()  # both runs' records have mask columns
    csv = pd.read_csv(out / "combined_box.csv")
    assert_matches_csv(parse_markdown((out / "combined_box.md").read_text()), csv)
    assert_matches_csv(parse_latex((out / "combined_box.tex").read_text()), csv)
    assert (out / "combined_box.tex").read_text().count("\\midrule") == 2  # header rule + one block rule


def test_gallery_is_rebuilt_from_cached_maps(real_run, run_copy, tmp_path):
    """The rebuilt gallery is the run's own picture, pixel for pixel; without a map store it
    is skipped with a message and the tables are still written."""
    message = rebuild_gallery(read_run(real_run), tmp_path / "g.png")
    assert message == f"gallery: {tmp_path / 'g.png'}"
    assert (tmp_path / "g.png").read_bytes() == (real_run / "gallery.png").read_bytes()
    (run_copy / "maps.json").unlink()
    (run_copy / "gallery.png").unlink()
    assert main([str(run_copy)]) == 0
    assert not (run_copy / "gallery.png").exists() and (run_copy / "table_box.csv").is_file()
    assert rebuild_gallery(read_run(run_copy), tmp_path / "h.png").startswith("gallery skipped: no map store")


def test_bad_run_folders_give_clear_errors(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    folder = hand_run(tmp_path / "run", "synthetic", "wsol_synthetic_vit")
    (folder / "records.csv").unlink()
    assert main([str(folder), "--check"]) == 1
    assert "records.csv is missing" in capsys.readouterr().out
    assert main([str(folder), "--allow-incomplete"]) == 2
    assert f"{folder / 'records.csv'} not found" in capsys.readouterr().err


def _records_without(folder: Path, prefix: str) -> None:
    """Drop the records' columns that start with `prefix`; the folder stays a complete run."""
    records = pd.read_csv(folder / "records.csv")
    records.drop(columns=[c for c in records if c.startswith(prefix)]).to_csv(folder / "records.csv", index=False)
    mark_complete(folder)


def test_run_folder_refusals_are_user_errors(tmp_path):
    """What the user can fix (a folder, a file of it, a setting, an argument) is a `UserError`
    of the most specific kind, which the commands print as one line."""
    with pytest.raises(MissingInputError, match="run folder .*missing does not exist"):
        read_run(tmp_path / "missing")
    folder = hand_run(tmp_path / "run", "synthetic", "wsol_synthetic_vit")
    (folder / "config.yaml").unlink()
    with pytest.raises(IncompleteRun, match="config.yaml is missing") as caught:
        read_run(folder)
    assert isinstance(caught.value, UserError)
    with pytest.raises(MissingInputError, match="config.yaml not found"):
        read_run(folder, allow_incomplete=True)
    columns = hand_run(tmp_path / "columns", "synthetic", "wsol_synthetic_vit")
    _records_without(columns, "correct")
    with pytest.raises(InputFileError, match=re.escape(f"{columns / 'records.csv'} lacks column(s) ['correct']")):
        run_tables(columns)
    setting = hand_run(tmp_path / "setting", "synthetic", "wsol_synthetic_vit",
                       metric={"image_filter": "most", "thresholds": [0.5]})
    with pytest.raises(SettingError, match=r"unknown image filter 'most' \(metric.image_filter\)"):
        run_tables(setting)
    boxes_only = hand_run(tmp_path / "boxes", "synthetic", "wsol_synthetic_vit")
    _records_without(boxes_only, "mask_")
    with pytest.raises(SettingError, match="no mask table"):
        combined_table([boxes_only], "mask")


GARBAGE_FILES = [  # (file of a run folder, content a damaged or foreign file has)
    pytest.param("records.csv", bytes(range(128, 256)) * 8, id="records-binary"),
    pytest.param("records.csv", b'image_id,method\n"im0,agcam\n', id="records-unclosed-quote"),
    pytest.param("records.csv", b"", id="records-empty"),
    pytest.param("config.yaml", bytes(range(128, 256)) * 8, id="config-binary"),
    pytest.param("config.yaml", b"metric: [correct\n", id="config-bad-yaml"),
    pytest.param("config.yaml", b"- metric\n- dataset\n", id="config-list"),
]


@pytest.mark.parametrize(("name", "content"), GARBAGE_FILES)
def test_garbage_run_folder_file_is_an_input_error_naming_it(tmp_path, capsys, name, content):
    """A damaged file of a run folder is refused naming it (exit code 2, one line), never an
    exception from the parser."""
    folder = hand_run(tmp_path / "run", "synthetic", "wsol_synthetic_vit")
    (folder / name).write_bytes(content)
    mark_complete(folder)
    with pytest.raises(InputFileError, match=re.escape(str(folder / name))):
        read_run(folder)
    assert main([str(folder)]) == 2
    assert f"error: {folder / name}" in capsys.readouterr().err


def test_damaged_manifest_and_tables_on_disk_are_named(tmp_path):
    """A run.json whose inputs are no mapping makes the folder incomplete; a table on disk that
    is no CSV is a difference that names it."""
    folder = hand_run(tmp_path / "run", "synthetic", "wsol_synthetic_vit")
    write_run_tables(folder)
    (folder / "table_box.csv").write_bytes(bytes(range(128, 256)) * 8)
    lines = check_run(folder)
    assert len(lines) == 1 and lines[0].startswith(f"{folder / 'table_box.csv'} is not a readable CSV table")
    write_json(folder / MANIFEST, {"format": 1, "complete": True, "inputs": ["records.csv"]})
    with pytest.raises(IncompleteRun, match="run.json is damaged"):
        read_run(folder)


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory) -> Path:
    """A real run with the threshold sweep: 6 synthetic images, AG-CAM and center."""
    from wsol_bench.run.runner import run

    root = tmp_path_factory.mktemp("sweep")
    overrides = ["method=[agcam,center]", "dataset.params.num_images=6", "batch_size=6", "gallery_images=0",
                 "progress=false", "run_name=test", f"store.root={root / 'cache'}", "sweep=grid",
                 "sweep.thresholds=[0.2,0.4,0.6]"]
    with initialize_config_module(config_module="wsol_bench.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    run(cfg, root / "run")
    return root / "run"


def test_sweep_and_wsoleval_tables_are_rebuilt_from_the_states_alone(sweep_run, tmp_path, capsys):
    """Delete sweep.csv and wsoleval.csv (and the map cache): the report writes them again,
    equal to the run's, from states/sweep.json; --check catches a tampered or missing one."""
    folder = Path(shutil.copytree(sweep_run, tmp_path / "copy"))
    assert (folder / "states" / "sweep.json").is_file()
    originals = {name: pd.read_csv(folder / f"{name}.csv") for name in ("sweep", "wsoleval")}
    for name in originals:
        (folder / f"{name}.csv").unlink()
    assert any("wsoleval.csv is missing" in line for line in check_run(folder))
    assert main([str(folder), "--no-gallery"]) == 0
    for name, frame in originals.items():
        pd.testing.assert_frame_equal(pd.read_csv(folder / f"{name}.csv"), frame)
    assert list(originals["sweep"]["threshold"].unique()) == [0.2, 0.4, 0.6]
    assert check_run(folder) == []
    tampered = originals["wsoleval"].copy()
    tampered.loc[0, "maxboxacc_v2"] += 1.0
    tampered.to_csv(folder / "wsoleval.csv", index=False)
    lines = check_run(folder)
    assert len(lines) == 1 and "wsoleval.csv: row 0 (agcam), maxboxacc_v2" in lines[0]


def test_states_are_read_by_a_fresh_process(sweep_run):
    """A state file names its metric classes; reading it needs no other import first."""
    import subprocess
    import sys

    code = ("from wsol_bench.metrics.base import load_states; "
            f"states = load_states({str(sweep_run / 'states' / 'sweep.json')!r}); "
            "print(sorted(states), sorted(states['agcam']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "['agcam', 'center'] ['box_accuracy', 'pxap', 'sweep']"
