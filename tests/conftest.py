"""Shared fixtures: tiny random timm ViTs prepared the way `load_model` prepares models."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from wsol_bench.models import disable_fused_attention

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def make_vit(seed: int = 0, *, img_size=32, patch_size=8, embed_dim=24, depth=3, num_heads=3,
             num_classes=5, **kwargs) -> torch.nn.Module:
    """A tiny random VisionTransformer: eval mode, fused attention off, frozen weights."""
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img_size,
                              patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                              num_heads=num_heads, num_classes=num_classes, **kwargs)
    # Random init leaves the class token and position embeddings near zero; spread them out
    # so maps differ between images and classes.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    disable_fused_attention(model)
    model.requires_grad_(False)
    return model.eval()


def reference_vit(spec: dict) -> tuple[torch.nn.Module, torch.Tensor]:
    """The seeded tiny ViT and images a reference fixture (tests/data/<method>/) was made on,
    rebuilt from its seeds; refused when timm's initialisation no longer gives its weights."""
    model = make_vit(**spec["make_vit"])
    checksum = sum(float(p.double().abs().sum()) for p in model.parameters())
    assert checksum == pytest.approx(spec["param_abs_sum"], rel=1e-9), \
        "timm's initialisation changed: the reference model cannot be rebuilt from its seed"
    images = torch.randn(spec["images_shape"], generator=torch.Generator().manual_seed(spec["images_seed"]))
    return model, images


def assert_batched_equals_single(explainer, model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor,
                                 rtol: float = 1e-4, atol: float = 1e-7) -> None:
    """The explainer's maps of a batch equal its maps one image at a time, and its logits are
    the model's own."""
    out = explainer(images, targets)
    single = torch.cat([explainer(images[i:i + 1], targets[i:i + 1]).maps for i in range(len(images))])
    torch.testing.assert_close(out.maps, single, rtol=rtol, atol=atol)
    torch.testing.assert_close(out.logits, model(images), rtol=1e-5, atol=1e-5)


@pytest.fixture
def tiny_vit() -> torch.nn.Module:
    return make_vit()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_worker():
    """Tiny tensors: one intra-op thread per test process avoids oversubscribing the cores
    (pytest -n 2 runs two processes), which makes tiny-model tests ~100x faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


REPO = Path(__file__).resolve().parents[1]
# The folders a wheel ships and where their files land in it (setup.py's package roots).
PACKAGE_ROOTS = {"wsol_bench": "wsol_bench", "methods": "wsol_bench/methods", "datasets": "wsol_bench/datasets",
                 "conf": "wsol_bench/conf", "hydra_plugins": "hydra_plugins"}
# Python run with the installed copy first on PYTHONPATH imports this before anything else: it
# drops the editable install's import hook of this environment (which would find a module the
# wheel lacks in the checkout), so the copy behaves as a plain `pip install .`.
HIDE_EDITABLE_INSTALL = (
    "import sys\n"
    "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
    "sys.path_hooks[:] = [h for h in sys.path_hooks if '__editable__' not in getattr(h, '__module__', '')]\n"
    "sys.path_importer_cache.clear()\n")


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip install .` builds from this checkout (built from a copy of what the build
    reads, so parallel test processes never share setuptools' build folder)."""
    import shutil
    import subprocess
    import sys

    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for folder in PACKAGE_ROOTS:
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(out), str(source)], check=True, timeout=600, capture_output=True)
    (found,) = out.glob("wsol_bench-*.whl")
    return found


@pytest.fixture(scope="session")
def installed_copy(tmp_path_factory, wheel) -> Path:
    """The project installed from its wheel as a user's `pip install .` would (not editable, console
    scripts in bin/) into a folder of its own; put it first on PYTHONPATH to use it."""
    import subprocess
    import sys

    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target),
                    str(wheel)], check=True, timeout=600, capture_output=True)
    (target / "sitecustomize.py").write_text(HIDE_EDITABLE_INSTALL)
    return target


class InputRecorder(nn.Module):
    """A stand-in model for the perturbation engines' tests: keeps a copy of every input image
    it is given; logits from the channel means."""

    def __init__(self) -> None:
        super().__init__()
        self.weights = nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)))
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs += list(x.clone())
        return x.mean((2, 3)) @ self.weights


class CommandResult:
    """What a command run in this process returned and printed."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


# The module of each console command's entry point (as pyproject.toml's scripts name them).
COMMAND_MODULES = {"wsol-bench": "wsol_bench.cli.bench", "wsol-bench-train": "wsol_bench.cli.train",
                   "wsol-bench-report": "wsol_bench.cli.report"}


def _forked_command(prog: str, args: list[str], cwd: str, output: str | None = None) -> None:
    """The child of `forked_command`: the command's entry point, its output discarded (or
    written to the file `output`), Ctrl-C raising KeyboardInterrupt as in a terminal."""
    import importlib
    import os
    import signal
    import sys

    signal.signal(signal.SIGINT, signal.default_int_handler)  # a test runner's worker may ignore it
    sink = os.open(output or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(sink, 1)
    os.dup2(sink, 2)
    sys.stdout = sys.stderr = os.fdopen(sink, "w", buffering=1)  # not the parent's capture buffers
    os.chdir(cwd)
    for name in ("HYDRA_FULL_ERROR", "WSOL_BENCH_DEBUG"):
        os.environ.pop(name, None)
    sys.argv = [prog, *args]
    try:
        code = importlib.import_module(COMMAND_MODULES[prog]).main()
    except SystemExit as exit_:
        code = exit_.code
    os._exit(int(code or 0) if isinstance(code, int) or code is None else 1)


def forked_command(prog: str, args: list[str], cwd: Path, output: Path | None = None):
    """Start console command `prog` with `args` from folder `cwd` in a real process of its own,
    forked from this one: it inherits the imported torch and timm, so it starts working at once
    (a new Python would spend seconds importing them first). For tests that kill a command
    mid-run; returns the multiprocessing.Process (exitcode -9 once SIGKILLed). What it prints
    goes to the file `output` when given. The command must not need gradients (use rollout or
    center, not agcam): once this test process has run a backward pass, PyTorch refuses autograd
    in a forked child, and which tests ran before depends on how pytest-xdist spreads them."""
    import multiprocessing

    child = multiprocessing.get_context("fork").Process(
        target=_forked_command, args=(prog, [str(a) for a in args], str(cwd), str(output) if output else None))
    child.start()
    return child


def command_in_process(prog: str, args: list[str], cwd: Path) -> CommandResult:
    """What the `command` fixture does, for module-scoped fixtures (which cannot use it): run a
    console command in this process from folder `cwd`, its printed output caught here."""
    import contextlib
    import importlib
    import io
    import os
    import sys

    saved_env = {name: os.environ.pop(name) for name in ("HYDRA_FULL_ERROR", "WSOL_BENCH_DEBUG")
                 if name in os.environ}
    saved_argv, saved_cwd = sys.argv, os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    try:
        os.chdir(cwd)
        sys.argv = [prog, *map(str, args)]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = importlib.import_module(COMMAND_MODULES[prog]).main()
            except SystemExit as exit_:
                code = exit_.code
    finally:
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        os.environ.update(saved_env)
    return CommandResult(int(code or 0), out.getvalue(), err.getvalue())


@pytest.fixture
def command():
    """Run a console command (`wsol-bench`, `wsol-bench-train`, `wsol-bench-report`) in this
    process as its console script would: `command("wsol-bench", [...], cwd)` returns its exit code
    and what it printed. The same entry point, Hydra and error handling as in a subprocess,
    without the start-up of a new Python."""
    return command_in_process
