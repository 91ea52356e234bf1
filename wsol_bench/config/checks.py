"""Checks of the `wsol-bench` settings that need no model, data or heavy library. The command
runs them before torch and timm load, so a bad value is refused at once, and the run runs them
again for a caller of the Python API. What needs the libraries (a model or dataset name, a
method's parameters, the device) is checked when the run starts."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from wsol_bench import choices
from wsol_bench.config.methods import check_method_entries
from wsol_bench.errors import MissingInputError, SettingError
from wsol_bench.progress import progress_enabled
from wsol_bench.regions.thresholds import check_thresholds

# setting -> its valid values; a group that is not selected (None) is not checked
CHOICES = {
    "mode": choices.RUN_MODES,
    "target": choices.TARGET_POLICIES,
    "store.dtype": choices.MAP_DTYPES,
    "preprocess.resize": choices.RESIZE_MODES,
    "preprocess.interpolation": choices.INTERPOLATIONS,
    "metric.box_protocol": choices.BOX_PROTOCOLS,
    "metric.image_filter": choices.IMAGE_FILTERS,
    "faithfulness.mode": choices.FAITHFULNESS_MODES,
    "faithfulness.integral": choices.FAITHFULNESS_INTEGRALS,
    "sweep.boxes": choices.SWEEP_BOXES,
    "segmentation.protocol": choices.SEGMENTATION_PROTOCOLS,
}
# counts the typed config cannot bound: setting -> its smallest value
MINIMUM_COUNTS = {"batch_size": 1, "num_workers": 0, "scoring_workers": 0, "gallery_images": 0, "store.shard_size": 1}


def check_choice(value: str | None, setting: str) -> None:
    """Refuse a value of `setting` that is not one of its choices (None: the default is used)."""
    valid = CHOICES[setting]
    if value is not None and value not in valid:
        raise SettingError(f"unknown {setting} {value!r}; valid: {', '.join(valid)}")


def check_std(std, setting: str = "preprocess.std") -> None:
    """Refuse a normalisation std that holds a 0 (normalising divides by it)."""
    if std is not None and any(float(s) == 0 for s in std):
        raise SettingError(f"{setting}={list(std)} holds a 0: normalising divides by it; give the "
                           "model's std (or null for its own)")


def check_checkpoint(path: str | None) -> None:
    """Refuse a model.checkpoint that names no file."""
    if path is not None and not Path(path).is_file():
        raise MissingInputError(f"model.checkpoint={path} does not exist; pass the path of a .safetensors or "
                                ".pth file")


def check_counts(cfg: DictConfig, minimums: dict[str, int] = MINIMUM_COUNTS) -> None:
    """Refuse a count below its minimum, naming the setting and its range."""
    for key, low in minimums.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and int(value) < low:
            raise SettingError(f"{key}={value} must be at least {low}")


def check_resume(value) -> str:
    """The trainer's `resume` as auto, true or false (a YAML bool included), or a SettingError."""
    resume = str(value).lower()
    if resume not in choices.RESUME_MODES:
        raise SettingError(f"resume={value!r}; valid: {', '.join(choices.RESUME_MODES)}")
    return resume


def check_trainer_settings(cfg: DictConfig) -> None:
    """The checks of a `wsol-bench-train` configuration that need no library (its own recipe
    checks the rest once torch is loaded)."""
    check_resume(cfg.resume)
    progress_enabled(cfg.progress)
    check_choice(cfg.preprocess.interpolation, "preprocess.interpolation")
    check_std(cfg.preprocess.std)
    check_checkpoint(cfg.model.checkpoint)
    check_counts(cfg, {"num_workers": 0, "train.epochs": 1, "train.batch_size": 1})


def check_settings(cfg: DictConfig) -> None:
    """Every check of a `wsol-bench` configuration that needs no library beyond OmegaConf and
    numpy; the first bad setting is a SettingError (or MissingInputError) naming it."""
    for setting in CHOICES:
        check_choice(OmegaConf.select(cfg, setting), setting)
    progress_enabled(cfg.progress)
    check_counts(cfg)
    check_std(cfg.preprocess.std)
    if cfg.mode == "run":  # a dataset summary needs no model, thresholds or methods
        check_checkpoint(cfg.model.checkpoint)
        check_thresholds(cfg.metric.thresholds, "metric.thresholds")
        if not cfg.method:
            raise SettingError("no method selected; e.g. method=[agcam,rollout]")
        check_method_entries(cfg.method)
