"""The benchmark loop: records per (image, method, threshold), batching invariance, target
policies, degenerate maps, and crash safety of the records file."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import make_vit

from wsol_bench.datasets import EvalTransform, build_dataset
from wsol_bench.methods import Explainer, get_explainer
from wsol_bench.report.tables import localization_table
from wsol_bench.run.pipeline import has_masks, process_dataset
from wsol_bench.run.scorers.records import LocalizationRecords
from wsol_bench.run.store import MapStore


class ConstantMap(Explainer):
    """A broken explainer: the same value everywhere (degenerate)."""

    class_specific = False

    def explain(self, images, targets):
        logits = self.logits_only(images)
        return torch.ones(len(images), *self.grid), logits, self.resolve_targets(logits, targets)


class FailsOnSecondBatch(ConstantMap):
    calls = 0

    def explain(self, images, targets):
        type(self).calls += 1
        if type(self).calls == 2:
            raise RuntimeError("simulated crash")
        return super().explain(images, targets)


@pytest.fixture(scope="module")
def setup():
    model = make_vit(0, img_size=64, patch_size=16, num_classes=6)
    ds = build_dataset("synthetic", split="val", num_images=6,
                       transform=EvalTransform((64, 64), (0.5,) * 3, (0.5,) * 3))
    return model, ds


def _run(setup, tmp_path, explainers, *, thresholds=(0.5,), target_policy="predicted", batch_size=16,
         shard_size=256):
    """Explain what the store lacks, then score every image into records.csv, as a run does."""
    _, ds = setup
    path = tmp_path / "records.csv"
    stores = {m: MapStore(tmp_path / "cache", {"method": m, "target_policy": target_policy}, shard_size)
              for m in explainers}
    records = LocalizationRecords(path, list(thresholds), dataset_name="synthetic", split="val",
                                  box_protocol="agcam", has_masks=has_masks(ds))
    try:
        process_dataset({target_policy: stores}, ds, [records], explainer=explainers.__getitem__,
                        target_policy=target_policy, batch_size=batch_size, progress=False)
    finally:
        records.close()
    return pd.read_csv(path), stores


def test_batch_size_does_not_change_any_number(setup, tmp_path):
    """Records with batch size 4 equal records with batch size 1."""
    model, _ = setup
    methods = {"agcam": get_explainer("agcam", model), "rollout": get_explainer("rollout", model)}
    a, _ = _run(setup, tmp_path / "a", methods, batch_size=4)
    b, _ = _run(setup, tmp_path / "b", methods, batch_size=1)
    def order(df):
        return df.sort_values(["method", "threshold", "image_id"]).reset_index(drop=True)

    pd.testing.assert_frame_equal(order(a), order(b), check_exact=False, atol=1e-6)


def test_threshold_sweep_rows_equal_single_threshold_runs(setup, tmp_path):
    """A run with thresholds [0.3, 0.6] gives, at 0.6, exactly the run with [0.6]."""
    model, _ = setup
    methods = {"agcam": get_explainer("agcam", model)}
    both, _ = _run(setup, tmp_path / "a", methods, thresholds=[0.3, 0.6])
    single, _ = _run(setup, tmp_path / "b", methods, thresholds=[0.6])
    assert len(both) == 12 and len(single) == 6
    at = both[both["threshold"] == 0.6].reset_index(drop=True)
    pd.testing.assert_frame_equal(at, single)


def test_label_policy_explains_the_ground_truth_class(setup, tmp_path):
    """target=label hands the labels to the explainer and records them as given targets."""
    model, _ = setup
    records, stores = _run(setup, tmp_path, {"agcam": get_explainer("agcam", model)}, target_policy="label")
    assert (records["target"] == records["label"]).all() and (records["target_source"] == "given").all()
    stored = torch.cat([s.targets for s in stores["agcam"].shards(6)])
    assert stored.tolist() == records["label"].tolist()
    with pytest.raises(ValueError, match="target policy"):
        _run(setup, tmp_path / "x", {"agcam": get_explainer("agcam", model)}, target_policy="gt")


def test_degenerate_maps_are_flagged_not_nan(setup, tmp_path):
    """A constant map is recorded with degenerate=1, no boxes and finite scores."""
    model, _ = setup
    records, _ = _run(setup, tmp_path, {"const": ConstantMap(model)})
    assert (records["degenerate"] == 1).all() and (records["n_pred_boxes"] == 0).all()
    assert records.filter(like="box_").notna().all().all()
    table = localization_table(records, "all")
    assert table.loc[("const", 0.5), "n_degenerate"] == 6


def test_a_crash_keeps_the_finished_shards_and_a_rerun_computes_only_the_rest(setup, tmp_path):
    """Shards finished before a crash stay on disk; the rerun explains only the missing
    shards and its records equal an uninterrupted run's."""
    model, _ = setup
    FailsOnSecondBatch.calls = 0
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(setup, tmp_path, {"const": FailsOnSecondBatch(model)}, batch_size=2, shard_size=2)
    assert sorted(p.name for p in (tmp_path / "cache").rglob("shard_*.pt")) == ["shard_000000.pt"]
    FailsOnSecondBatch.calls = 10  # no more crashes
    resumed, _ = _run(setup, tmp_path, {"const": FailsOnSecondBatch(model)}, batch_size=2, shard_size=2)
    assert FailsOnSecondBatch.calls == 12  # shards 1 and 2 only
    straight, _ = _run(setup, tmp_path / "straight", {"const": ConstantMap(model)}, batch_size=2, shard_size=2)
    pd.testing.assert_frame_equal(resumed, straight)


def test_a_finished_run_is_rescored_without_any_model_pass(setup, tmp_path):
    """Second run on the same settings with other thresholds: no forward pass at all."""
    model, _ = setup
    methods = {"agcam": get_explainer("agcam", model), "center": get_explainer("center", model)}
    first, _ = _run(setup, tmp_path, methods, thresholds=[0.5])
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        again, _ = _run(setup, tmp_path, methods, thresholds=[0.3, 0.5])
    finally:
        hook.remove()
    assert calls == []
    at = again[again["threshold"] == 0.5].reset_index(drop=True)
    pd.testing.assert_frame_equal(at, first)


def test_model_free_baselines_reuse_logits(setup, tmp_path):
    """random and center after agcam add no model pass: one forward per batch in total."""
    model, _ = setup
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        _run(setup, tmp_path, {"agcam": get_explainer("agcam", model), "random": get_explainer("random", model),
                               "center": get_explainer("center", model)}, batch_size=3)
    finally:
        hook.remove()
    assert len(calls) == 2  # 6 images, batch 3: AG-CAM's pass only


def test_empty_threshold_list_is_refused(setup, tmp_path):
    """No thresholds is a configuration error naming the setting."""
    model, _ = setup
    with pytest.raises(ValueError, match="metric.thresholds"):
        _run(setup, tmp_path, {"center": get_explainer("center", model)}, thresholds=[])


def test_markdown_and_latex_tables_round_trip(setup, tmp_path):
    """The paper-layout Markdown and LaTeX tables parse back to the CSV table's numbers."""
    from wsol_bench.report.table_format import write_table_files
    from wsol_bench.report.tables import paper_table

    model, _ = setup
    records, _ = _run(setup, tmp_path, {"agcam": get_explainer("agcam", model),
                                        "center": get_explainer("center", model)})
    table = localization_table(records, "all")
    paths = [p for v in ("box", "mask")
             for p in write_table_files(paper_table(table, v), tmp_path, f"table_{v}", formats=("md", "tex"))]
    assert sorted(p.name for p in paths) == ["table_box.md", "table_box.tex", "table_mask.md", "table_mask.tex"]
    expected = paper_table(table, "box")
    md = pd.read_csv(tmp_path / "table_box.md", sep="|", skipinitialspace=True).iloc[1:, 1:-1]
    md.columns = [c.strip() for c in md.columns]
    assert list(md.columns) == list(expected.columns)
    assert [m.strip() for m in md["method"]] == list(expected["method"])
    for col in ("Pixel Acc", "IoU", "Dice"):
        assert [float(v) for v in md[col]] == [round(v, 2) for v in expected[col]]
    tex = (tmp_path / "table_box.tex").read_text()
    body = tex.split("\\midrule")[1].split("\\bottomrule")[0].strip().splitlines()
    rows = [[c.strip().rstrip("\\").strip() for c in line.split("&")] for line in body]
    assert [r[0] for r in rows] == list(expected["method"])
    assert [float(r[2]) for r in rows] == [round(v, 2) for v in expected["IoU"]]


def test_label_maps_reuse_the_predicted_class_maps(setup, tmp_path):
    """With both target policies, the ground-truth-class maps of a method that is not
    class-specific, and of an image predicted as its label, are the predicted-class maps; only
    the other images pass through the model again. The stored label maps equal a label-only
    run's (exactly where reused, to float rounding where explained in a smaller batch)."""
    _, ds = setup
    model = make_vit(4, img_size=64, patch_size=16, num_classes=6)  # gets 1 of the 6 images right
    methods = {"agcam": get_explainer("agcam", model), "rollout": get_explainer("rollout", model)}

    def stores(root, policies):
        return {p: {m: MapStore(root, {"method": m, "target_policy": p}, 256) for m in methods} for p in policies}

    samples = []
    hook = model.register_forward_hook(lambda module, args, out: samples.append(len(args[0])))
    try:
        both = stores(tmp_path / "both", ("predicted", "label"))
        process_dataset(both, ds, [], explainer=methods.__getitem__, progress=False)
        reused = sum(samples)
        samples.clear()
        alone = stores(tmp_path / "alone", ("label",))
        process_dataset(alone, ds, [], explainer=methods.__getitem__, target_policy="label", progress=False)
    finally:
        hook.remove()
    predicted = both["predicted"]["agcam"].load(0, 6)
    labels = torch.tensor([ds[i].label for i in range(6)])
    wrong = int((predicted.targets != labels).sum())
    assert 0 < wrong < 6  # the random model gets some right and some wrong
    assert reused == 6 + 6 + wrong  # agcam and rollout on every image, agcam again on the wrong ones
    for m in methods:
        got, want = both["label"][m].load(0, 6), alone["label"][m].load(0, 6)
        assert got.targets.tolist() == want.targets.tolist() == labels.tolist()
        assert got.target_source == want.target_source == "given"
        torch.testing.assert_close(got.maps, want.maps, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    right = (predicted.targets == labels).nonzero()[:, 0]
    assert torch.equal(both["label"]["agcam"].load(0, 6).maps[right], predicted.maps[right])
    assert torch.equal(both["label"]["rollout"].load(0, 6).maps, both["predicted"]["rollout"].load(0, 6).maps)
