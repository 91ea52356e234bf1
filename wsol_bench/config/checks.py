"""Checks of the `wsol-bench` settings that need no model, data or heavy library. The command
runs them before torch and timm load, so a bad value is refused at once, and the run runs them
again for a caller of the Python API. What needs the libraries (a model or dataset name, a
method's parameters, the device) is checked when the run starts."""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from wsol_bench import choices
from wsol_bench.config.methods import check_method_entries
from wsol_bench.errors import MissingInputError, SettingError
from wsol_bench.limits import check_image_pixels, check_memory, memory_limit
from wsol_bench.progress import progress_enabled
from wsol_bench.regions.thresholds import check_thresholds, threshold_grid

# setting -> its valid values; a group that is not selected (None) is not checked
CHOICES = {
    "mode": choices.RUN_MODES,
    "target": choices.TARGET_POLICIES,
    "store.dtype": choices.MAP_DTYPES,
    "preprocess.resize": choices.RESIZE_MODES,
    "preprocess.interpolation": choices.INTERPOLATIONS,
    "metric.box_protocol": choices.BOX_PROTOCOLS,
    "metric.image_filter": choices.IMAGE_FILTERS,
    "faithfulness.mode": choices.FAITHFULNESS_MEASURES,
    "faithfulness.integral": choices.FAITHFULNESS_INTEGRALS,
    "sweep.boxes": choices.SWEEP_BOXES,
    "segmentation.protocol": choices.SEGMENTATION_PROTOCOLS,
}
# counts the typed config cannot bound: setting -> its smallest value
MINIMUM_COUNTS = {"batch_size": 1, "num_workers": 0, "scoring_workers": 0, "gallery_images": 0, "store.shard_size": 1,
                  "report.resamples": 2}
# Drawing one synthetic image peaks at 64 to 80 bytes per pixel (measured at 2048 and 4096 pixels a
# side: its float64 RGB background and the temporaries of blending it); the larger is used.
SYNTHETIC_BYTES_PER_PIXEL = 80
FLOAT32_BYTES = 4
# Hydra launchers -> the program each one submits jobs with, which must be on PATH
LAUNCHER_PROGRAMS = {"submitit_slurm": "sbatch"}
LAUNCHER_OVERRIDE = re.compile(r"^\+{0,2}hydra/launcher=(?P<name>.+)$")
MULTIRUN_FLAGS = ("-m", "--multirun", "hydra.mode=MULTIRUN")


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


def check_interval_level(level) -> None:
    """`report.ci` is a level in (0, 1) or null (no intervals); refused before any work, as the
    tables that use it are built only at the end of a run."""
    if level is not None and not 0 < float(level) < 1:
        raise SettingError(f"report.ci={level} must lie in (0, 1), e.g. 0.95; or null for no intervals")


def check_counts(cfg: DictConfig, minimums: dict[str, int] = MINIMUM_COUNTS) -> None:
    """Refuse a count below its minimum, naming the setting and its range."""
    for key, low in minimums.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and int(value) < low:
            raise SettingError(f"{key}={value} must be at least {low}")


def check_sweep(node: DictConfig) -> list[float]:
    """The sweep's thresholds (an explicit list, or numpy.arange(start, stop, step), whose length
    is checked before the grid is built), or a SettingError naming the setting; also checks
    `sweep.resamples`."""
    resamples = node.get("resamples", 0)
    if resamples == 1 or resamples < 0:
        raise SettingError(f"sweep.resamples={resamples} must be 0 (no intervals on the sweep curve) or at least "
                           "2 (200 is the default)")
    if node.thresholds is not None:
        return check_thresholds(node.thresholds, "sweep.thresholds")
    return threshold_grid(node.start, node.stop, node.step, "sweep")


def _size_pair(value) -> tuple[int, int] | None:
    """An image size setting (an int, or [H, W]) as (H, W); None when unset or of another shape
    (the code that reads it names that)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, (list, tuple, ListConfig)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return int(value[0]), int(value[1])
    return None


def model_input_size(cfg: DictConfig) -> tuple[str, tuple[int, int]] | None:
    """(setting, (H, W)) of the model's input as the settings give it (preprocess.input_size,
    else model.kwargs.img_size); None when only the model knows it (the run checks that size
    when it starts, from the architecture)."""
    for setting in ("preprocess.input_size", "model.kwargs.img_size"):
        size = _size_pair(OmegaConf.select(cfg, setting, default=None))
        if size is not None:
            return setting, size
    return None


def check_batch_memory(batch_size: int, input_size: tuple[int, int], attention: tuple[int, int, int] = (0, 0, 0),
                       *, total: int | None = None, where: str = "this machine's memory") -> None:
    """Refuse a batch_size whose input batch (batch x 3 x H x W float32) and, where known, its
    attention maps (`attention` = (layers, heads, tokens): batch x heads x tokens^2 float32 per
    layer) exceed the memory limit (`wsol_bench.limits.memory_limit` of `total`)."""
    height, width = input_size
    layers, heads, tokens = attention
    per_image = (3 * height * width + layers * heads * tokens * tokens) * FLOAT32_BYTES
    limit = memory_limit(total)
    if limit is None or batch_size * per_image <= limit:
        return
    what = f"batch_size={batch_size}: the input batch ({batch_size} x 3 x {height} x {width} float32)"
    if layers:
        what += f" with its attention maps ({layers} layers x {heads} heads x {tokens}x{tokens} tokens)"
    fits = limit // per_image
    fix = (f"lower batch_size to at most {fits}" if fits else
           "one image alone does not fit: lower the input size (preprocess.input_size)")
    check_memory(batch_size * per_image, what, fix, total=total, where=where)


def check_image_sizes(cfg: DictConfig) -> None:
    """Refuse image sizes the machine cannot hold: a synthetic image (dataset.params.image_size)
    or a model input (preprocess.input_size, model.kwargs.img_size) beyond the pixels one image
    may have, a drawn image beyond the memory limit, and a batch of model inputs beyond it."""
    size = OmegaConf.select(cfg, "dataset.params.image_size", default=None)
    if isinstance(size, int) and size > 0:
        setting = f"dataset.params.image_size={size}"
        check_image_pixels(size, size, setting, "lower it (the shipped model takes 224)")
        check_memory(size * size * SYNTHETIC_BYTES_PER_PIXEL, f"{setting}: drawing one image", "lower it")
    given = model_input_size(cfg)
    if given is not None:
        setting, (height, width) = given
        check_image_pixels(height, width, f"{setting}=[{height}, {width}]", "give a smaller input size")
        if cfg.get("mode", "run") == "run":
            check_batch_memory(int(cfg.batch_size), (height, width))


def check_launcher(argv: Sequence[str]) -> None:
    """Refuse a sweep (-m) whose Hydra launcher submits jobs with a program this machine lacks
    (hydra/launcher=submitit_slurm without SLURM's sbatch), before Hydra and the launcher start;
    `argv` is the command line after the program's name."""
    if not any(arg in MULTIRUN_FLAGS for arg in argv):
        return  # a single run never starts the launcher
    for arg in argv:
        match = LAUNCHER_OVERRIDE.match(arg)
        program = LAUNCHER_PROGRAMS.get(match["name"]) if match else None
        if program is not None and shutil.which(program) is None:
            raise SettingError(f"hydra/launcher={match['name']} submits the sweep's jobs to SLURM with {program}, "
                               f"which is not found on this machine (not on PATH); run the jobs here with "
                               "hydra/launcher=submitit_local or hydra/launcher=joblib, or start the sweep on a "
                               "SLURM login node")


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
    check_image_sizes(cfg)
    check_interval_level(OmegaConf.select(cfg, "report.ci"))
    if cfg.mode == "run":  # a dataset summary needs no model, thresholds or methods
        check_checkpoint(cfg.model.checkpoint)
        check_thresholds(cfg.metric.thresholds, "metric.thresholds")
        if cfg.get("sweep"):
            check_sweep(cfg.sweep)
        if not cfg.method:
            raise SettingError("no method selected; e.g. method=[agcam,rollout]")
        check_method_entries(cfg.method)
        check_method_entries(cfg.get("measure") or {}, "measure", "measure")
