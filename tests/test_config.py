"""Typed configs: the schemas leave every composed config as the YAML tree gave it, refuse
typo'd keys and wrong types at compose time with the key's name, mirror the code they feed,
and method parameters are checked against the explainer's constructor."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from omegaconf import MISSING, OmegaConf

from wsol_bench.config import check_method_params
from wsol_bench.config.datasets import (
    CubParams,
    ImageNetParams,
    SyntheticParams,
    VocParams,
    VocSegmentationParams,
)
from wsol_bench.config.errors import one_line
from wsol_bench.config.groups import FaithfulnessConfig
from wsol_bench.config.keys import check_known_keys, removed_keys, unknown_keys
from wsol_bench.config.trainer import TrainConfig
from wsol_bench.methods import Explainer, registry

EXPECTED = json.loads((Path(__file__).parent / "data" / "composed_configs.json").read_text())
CASES = [(name, case["overrides"], case["config"])
         for name in ("config", "trainer") for case in EXPECTED[name]]
OPTIONAL_GROUPS = ("faithfulness", "sweep", "segmentation")  # the schema holds them as None when not selected


def composed(name: str, overrides: list[str]) -> dict:
    """The resolved config (`${hydra:...}` included), `???` kept."""
    with initialize_config_module("wsol_bench.conf", version_base="1.3"):
        HydraConfig.instance().set_config(compose(name, overrides=overrides, return_hydra_config=True))
        cfg = compose(name, overrides=overrides)
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def same(actual, expected, key: str = "") -> list[str]:
    """Differences between two resolved configs; an int becoming the equal float of a float
    field (train.warmup_epochs: 2 -> 2.0) is no difference, a bool never equals a number."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        keys = sorted(set(actual) | set(expected))
        absent = "<absent>"
        return [d for k in keys for d in same(actual.get(k, absent), expected.get(k, absent), f"{key}{k}.")]
    if isinstance(expected, list) and isinstance(actual, list) and len(actual) == len(expected):
        return [d for i, (a, e) in enumerate(zip(actual, expected)) for d in same(a, e, f"{key}{i}.")]
    numbers = (int, float)
    if (type(actual) is type(expected) or (type(actual) in numbers and type(expected) in numbers)) \
            and actual == expected:
        return []
    return [f"{key[:-1]}: {expected!r} -> {actual!r}"]


def refusal(name: str, overrides: list[str]) -> str:
    """The one-line message of the composition error Hydra raises for `overrides`."""
    with pytest.raises(ConfigCompositionException) as info, \
            initialize_config_module("wsol_bench.conf", version_base="1.3"):
        compose(name, overrides=overrides)
    return one_line(info.value, name, overrides)


# ---------------------------------------------------------------- the composed configs are unchanged


@pytest.mark.parametrize("name,overrides,expected", CASES,
                         ids=[f"{n}:{' '.join(o) or 'defaults'}" for n, o, _ in CASES])
def test_composed_configs_equal_the_yaml_tree_before_the_schemas(name, overrides, expected):
    expected = {**{g: None for g in OPTIONAL_GROUPS if name == "config"}, **expected}
    assert same(composed(name, overrides), expected) == []


def test_mandatory_values_stay_missing():
    """`???` in a preset stays mandatory: the schema gives those fields no default."""
    with initialize_config_module("wsol_bench.conf", version_base="1.3"):
        for preset, key in (("paper_imagenet", "dataset.params.root"), ("paper_cub", "model.checkpoint"),
                            ("paper_voc", "dataset.params.root")):
            cfg = compose("config", overrides=[f"experiment={preset}"])
            parent, _, leaf = key.rpartition(".")
            assert OmegaConf.is_missing(OmegaConf.select(cfg, parent), leaf), (preset, key)


def test_schemas_are_not_listed_as_config_groups():
    """--help lists only groups a user selects from."""
    with initialize_config_module("wsol_bench.conf", version_base="1.3"):
        groups = GlobalHydra.instance().config_loader().list_groups("")
    assert "dataset" in groups and "method" in groups
    assert not [g for g in groups if "schema" in g]


# ---------------------------------------------------------------- refusals name the key


@pytest.mark.parametrize("name,overrides,expected", [
    ("config", ["batch_sise=3"], "unknown key batch_sise; valid keys here: dataset, model, method"),
    ("config", ["batch_size=abc"], "batch_size: Value 'abc' of type 'str' could not be converted to Integer"),
    ("config", ["store.shard_sise=3"], "unknown key store.shard_sise; valid keys here: root, shard_size"),
    ("config", ["preprocess.mean=[a,b,c]"], "preprocess.mean[0]: Value 'a'"),
    ("config", ["dataset.params.num_image=3"],
     "unknown key dataset.params.num_image; valid keys here: split, num_images, seed, image_size"),
    ("config", ["dataset.params.num_images=many"], "dataset.params.num_images: Value 'many'"),
    ("config", ["dataset=voc", "dataset.params.multilabel=skip"], "unknown key dataset.params.multilabel"),
    ("config", ["dataset=imagenet", "dataset.params.num_images=all"],
     "dataset.params.num_images: Value 'all'"),
    ("config", ["model.pretrianed=true"], "unknown key model.pretrianed"),
    ("config", ["model.pretrained=maybe"], "model.pretrained: Value 'maybe' is not a valid bool"),
    ("config", ["metric.thresholds=[half]"], "metric.thresholds[0]: Value 'half'"),
    ("config", ["method.agcam.parms={}"], "unknown key method.agcam.parms; valid keys here: name, params"),
    ("config", ["model.kwargs.img_size=32"],
     "unknown key model.kwargs.img_size; add it with +model.kwargs.img_size=32"),
    ("config", ["faithfulness=abpc", "faithfulness.steps=many"], "faithfulness.steps: Value 'many'"),
    ("config", ["faithfulness=deletion", "faithfulness.blur_sigm=2"], "unknown key faithfulness.blur_sigm"),
    ("config", ["sweep=grid", "sweep.step=small"], "sweep.step: Value 'small'"),
    ("config", ["sweep.step=0.1"], "sweep.step: no sweep is selected; choose one first, e.g. sweep=grid"),
    ("config", ["faithfulness.steps=5"],
     "faithfulness.steps: no faithfulness is selected; choose one first, e.g. faithfulness=abpc"),
    ("config", ["experiment=paper_cub", "faithfulness.amp=sometimes"], "faithfulness.amp: Value 'sometimes'"),
    ("config", ["sweep=grid", "sweep.iou_threshold=[50]"], "unknown key sweep.iou_threshold"),
    ("config", ["dataset=nonexistent"], "unknown dataset 'nonexistent'; valid: cub, imagenet, imagenet_segmentation, openimages, synthetic"),
    ("trainer", ["seed=abc"], "seed: Value 'abc'"),
    ("trainer", ["preprocess.resize=timm"], "unknown key preprocess.resize"),
    ("trainer", ["train.epochs=many"], "train.epochs: Value 'many'"),
    ("trainer", ["train=cub", "train.lr_decay=0.5"],
     "unknown key train.lr_decay; valid keys here: train_params"),
    ("trainer", ["train.cache=sometimes"], "train.cache: Value 'sometimes' is not a valid bool"),
])
def test_refused_at_compose_time_with_the_key(name, overrides, expected):
    line = refusal(name, overrides)
    assert expected in line and "\n" not in line


def test_unknown_method_lists_the_valid_ones():
    """A list of methods with one unknown: Hydra's error names the file only; the line lists
    the options of the method group."""
    line = refusal("config", ["method=[agcam,nonexistent]"])
    options = sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "method").glob("*.yaml"))
    assert {"agcam", "center", "generic_attention", "gradcam"} <= set(options)
    assert line == f"unknown method 'nonexistent'; valid: {', '.join(options)}"


def test_a_wrong_type_in_a_config_file_names_the_key_and_the_file(tmp_path):
    """A config folder on the search path whose dataset file lists a schema but gives a wrong type."""
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "broken.yaml").write_text(
        "defaults:\n  - /schema_dataset_synthetic@_here_\n  - _self_\n"
        "name: synthetic\nsplit: val\nparams:\n  num_images: lots\n")
    line = refusal("config", [f"hydra.searchpath=[file://{tmp_path}]", "dataset=broken"])
    assert "dataset.params.num_images: Value 'lots'" in line and "dataset/broken" in line


def test_keys_added_with_plus_are_found():
    """`+key=value` opens the node, so Hydra lets it pass; the commands check before any work."""
    with initialize_config_module("wsol_bench.conf", version_base="1.3"):
        cfg = compose("config", overrides=["+dataset.params.num_image=3", "++model.kwargs.img_size=32",
                                           "+method.agcam.params.extra=1", "faithfulness=abpc",
                                           "+faithfulness.stepz=3"])
        train = compose("trainer", overrides=["+train.lr_decay=0.5", "++train.timm_augment.re_prob=0.1"])
        clean = compose("config", overrides=["experiment=paper_voc", "sweep=grid"])
    assert [k for k, _ in unknown_keys(cfg)] == ["dataset.params.num_image", "faithfulness.stepz"]
    assert [k for k, _ in unknown_keys(train)] == ["train.lr_decay"]  # dict fields take any key
    assert unknown_keys(clean) == [] and removed_keys(clean) == []
    with pytest.raises(ValueError, match="unknown key dataset.params.num_image; valid keys here: split"):
        check_known_keys(cfg)


def test_deleted_keys_are_found():
    """`~key` removes a declared top-level key; the command needs it."""
    with initialize_config_module("wsol_bench.conf", version_base="1.3"):
        cfg = compose("config", overrides=["~batch_size"])
    assert removed_keys(cfg) == ["batch_size"]
    with pytest.raises(ValueError, match="batch_size cannot be deleted"):
        check_known_keys(cfg)


# ---------------------------------------------------------------- the schemas mirror the code


def test_train_schema_mirrors_the_recipe_and_the_data_keys():
    from wsol_bench.train.recipe import DATA_KEYS
    from wsol_bench.train.trainer import Recipe

    schema = {f.name: f for f in dataclasses.fields(TrainConfig)}
    recipe = {f.name: f for f in dataclasses.fields(Recipe)}
    assert set(schema) == set(recipe) | set(DATA_KEYS)
    for name, f in recipe.items():  # Recipe's defaults, or mandatory where it has none
        default = MISSING if f.default is dataclasses.MISSING else f.default
        assert schema[name].default == default, name


def test_faithfulness_schema_mirrors_the_settings():
    from wsol_bench.metrics.faithfulness import FaithfulnessSettings

    def defaults(cls):
        return {f.name: f.default for f in dataclasses.fields(cls)}
    assert defaults(FaithfulnessConfig) == defaults(FaithfulnessSettings)


@pytest.mark.parametrize("schema,dataset,fixed", [
    (SyntheticParams, "synthetic", {"two_class", "first_index"}),
    (ImageNetParams, "imagenet", set()),
    (VocParams, "voc", set()),
    (VocSegmentationParams, "voc", {"mode"}),
    (CubParams, "cub", set()),
])
def test_dataset_params_mirror_the_class_keyword_arguments(schema, dataset, fixed):
    """Same names and defaults as the class (mandatory where it has none), minus the transform,
    what the dataset name fixes, and synthetic's training-only first_index."""
    from wsol_bench.datasets.cub import CubDataset
    from wsol_bench.datasets.imagenet import ImageNetVal
    from wsol_bench.datasets.synthetic import SyntheticShapes
    from wsol_bench.datasets.voc import VocDataset

    classes = {"synthetic": SyntheticShapes, "imagenet": ImageNetVal, "voc": VocDataset, "cub": CubDataset}
    cls = classes[dataset]
    params = {p.name: (MISSING if p.default is p.empty else p.default)
              for p in inspect.signature(cls).parameters.values() if p.name not in fixed | {"transform"}}
    assert {f.name: f.default for f in dataclasses.fields(schema)} == params


# ---------------------------------------------------------------- method parameters


def test_method_params_are_checked_against_the_constructor():
    check_method_params("agcam", {"head_fusion": "mean", "layer_fusion": "sum"})
    check_method_params("rollout", {})
    with pytest.raises(ValueError) as info:
        check_method_params("agcam", {"head_fusoin": "mean"})
    assert str(info.value) == ("method 'agcam' takes no parameter 'head_fusoin'; "
                               "valid: head_fusion, layer_fusion")
    with pytest.raises(ValueError, match="method 'gradcam' takes no parameter 'layer'; valid: none"):
        check_method_params("gradcam", {"layer": 3})  # the base Explainer's **params refuses extras
    with pytest.raises(ValueError, match="unknown method 'not_registered'; valid: .*agcam, "):
        check_method_params("not_registered", {"x": 1})


def test_method_params_of_a_plugin_follow_its_signature(monkeypatch):
    class Open(Explainer):
        def __init__(self, model, **options):
            super().__init__(model)

    class Closed(Explainer):
        def __init__(self, model, *, power: float = 1.0):
            super().__init__(model)

    monkeypatch.setitem(registry._REGISTRY, "open", Open)
    monkeypatch.setitem(registry._REGISTRY, "closed", Closed)
    check_method_params("open", {"anything": 1})
    check_method_params("closed", {"power": 2.0})
    with pytest.raises(ValueError, match="method 'closed' takes no parameter 'powr'; valid: power"):
        check_method_params("closed", {"powr": 2.0})


def test_every_choice_setting_is_checked_before_the_libraries_load():
    """wsol_bench.choices is the one list of each choice setting's values: the modules that act
    on a setting use it, and `check_settings` (run before torch loads) refuses any other value in
    one line naming the setting and the valid ones."""
    from omegaconf import OmegaConf

    from wsol_bench import choices
    from wsol_bench.config.checks import CHOICES, check_settings
    from wsol_bench.datasets import base
    from wsol_bench.errors import SettingError
    from wsol_bench.metrics import faithfulness_settings
    from wsol_bench.regions import engine, rasterize
    from wsol_bench.report import tables
    from wsol_bench.run import pipeline, store
    from wsol_bench.run.scorers import segmentation

    assert tuple(base._PIL_FILTERS) == choices.INTERPOLATIONS and base.RESIZE_MODES == choices.RESIZE_MODES
    assert faithfulness_settings.MODES == choices.FAITHFULNESS_MODES and engine.SOURCES == choices.SWEEP_BOXES
    assert rasterize.PROTOCOLS == choices.BOX_PROTOCOLS and tables.FILTERS == choices.IMAGE_FILTERS
    assert pipeline.TARGET_POLICIES == choices.TARGET_POLICIES and tuple(store.MAP_DTYPES) == choices.MAP_DTYPES
    assert segmentation.PROTOCOLS == choices.SEGMENTATION_PROTOCOLS
    for setting in CHOICES:
        group = setting.split(".")[0]
        extra = {"faithfulness": ["faithfulness=abpc"], "sweep": ["sweep=grid"],
                 "segmentation": ["segmentation=chefer"]}.get(group, [])
        with initialize_config_module("wsol_bench.conf", version_base="1.3"):
            cfg = compose("config", overrides=extra)
        OmegaConf.update(cfg, setting, "nonsense", force_add=True)
        with pytest.raises(SettingError, match=rf"^unknown {setting} 'nonsense'; valid: "):
            check_settings(cfg)
