"""One error model in every command: a refusal (a `UserError`, a bad configuration, an unreadable
file, a full or forbidden folder) is one line on stderr and exit code 2; anything else is a bug,
shown with its traceback, a line saying so, and exit code 1."""

from __future__ import annotations

import errno
import sys

import pytest
import torch

import wsol_bench.cli.report as report_cli
import wsol_bench.run.runner as runner
import wsol_bench.train.recipe as recipe
from wsol_bench.cli.errors import file_system_line, refusal_line
from wsol_bench.errors import InputFileError, MissingInputError, SettingError, UserError

TINY_TRAIN = ["model.name=vit_tiny_patch16_224", ("++model.kwargs={img_size:32,patch_size:8,embed_dim:24,depth:2,"
              "num_heads:3}"), "model.pretrained=false", "preprocess.input_size=[32,32]", "dataset.params.image_size=32",
              "train.train_params.num_images=8", "train.val_params.num_images=4", "train.batch_size=4",
              "train.epochs=1", "num_workers=0", "progress=false", "threads=1"]


class _Opaque:
    """A Python object in a pickle: torch.load(weights_only=True) refuses it."""


def bad_files(folder):
    """A file of garbage bytes and a pickle payload, each with a name the commands accept."""
    folder.mkdir(parents=True, exist_ok=True)
    garbage, payload = folder / "garbage.pth", folder / "payload.pth"
    garbage.write_bytes(b"\x00not a checkpoint\xff" * 16)
    torch.save({"state_dict": _Opaque()}, payload)
    return garbage, payload


def assert_one_line(result, *needles: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines[0].startswith("wsol-bench"), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def assert_bug(result, prog: str, exception: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback (most recent call last)" in result.stderr, result.stderr[-3000:]
    assert any(line.startswith(exception) for line in lines), lines[-5:]
    assert lines[-1].startswith(f"{prog}: internal error: the traceback above is a bug in wsol-bench"), lines[-1]


def test_a_bug_shows_its_traceback_in_every_command(command, monkeypatch, tmp_path):
    """A built-in exception from the suite's own code (here a KeyError, a ValueError and a
    TypeError, which the commands once printed as user errors) is a bug: traceback, exit 1."""
    def bug(exception):
        def raise_it(*args, **kwargs):
            raise exception
        return raise_it

    monkeypatch.setattr(runner, "run", bug(KeyError("a scorer's missing column")))
    assert_bug(command("wsol-bench", ["method=[center]", "hydra.run.dir=run"], tmp_path), "wsol-bench", "KeyError")
    monkeypatch.setattr(recipe, "train_from_config", bug(ValueError("a bad shape")))
    assert_bug(command("wsol-bench-train", [f"out_dir={tmp_path / 'train'}"], tmp_path), "wsol-bench-train",
               "ValueError")
    monkeypatch.setattr(report_cli, "report_one", bug(TypeError("a bad table")))
    assert_bug(command("wsol-bench-report", [str(tmp_path)], tmp_path), "wsol-bench-report", "TypeError")


def test_a_refusal_from_inside_the_run_is_one_line(command, monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise InputFileError("annotation file /data/x.xml is not XML; fix or remove it")

    monkeypatch.setattr(runner, "run", refuse)
    assert_one_line(command("wsol-bench", ["hydra.run.dir=run"], tmp_path), "/data/x.xml is not XML")


def test_debug_shows_the_traceback_of_a_refusal(monkeypatch, tmp_path):
    from wsol_bench.cli.bench import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WSOL_BENCH_DEBUG", "1")
    monkeypatch.setattr(sys, "argv", ["wsol-bench", "progress=maybe", "hydra.run.dir=run"])
    with pytest.raises(SettingError, match="progress='maybe'"):
        main()


def test_an_unreadable_checkpoint_is_one_line_in_both_commands(command, tmp_path):
    """Garbage bytes and a pickle payload, as the benchmark's and the trainer's model.checkpoint
    and as the trainer's resume file: one line naming the file, no traceback, no work done."""
    garbage, payload = bad_files(tmp_path / "files")
    for path in (garbage, payload):
        bench = command("wsol-bench", [f"model.checkpoint={path}", "method=[center]", "dataset.params.num_images=2",
                                       "progress=false", f"store.root={tmp_path / 'cache'}", "hydra.run.dir=run"],
                        tmp_path)
        assert_one_line(bench, str(path))
        train = command("wsol-bench-train", [*TINY_TRAIN, f"model.checkpoint={path}", f"out_dir={tmp_path / 'out'}",
                                             f"cache_dir={tmp_path / 'tcache'}"], tmp_path)
        assert_one_line(train, str(path))
        resume_dir = tmp_path / f"resume_{path.stem}"
        resume_dir.mkdir()
        (resume_dir / recipe.CHECKPOINT).write_bytes(path.read_bytes())
        resumed = command("wsol-bench-train", [*TINY_TRAIN, f"out_dir={resume_dir}", f"cache_dir={tmp_path / 'tcache'}"],
                          tmp_path)
        assert_one_line(resumed, str(resume_dir / recipe.CHECKPOINT), "resume=false")
    assert not list((tmp_path / "cache").rglob("shard_*.pt"))  # no maps computed (a shard's lock file at most)


def test_refusal_lines_and_bugs():
    """Which exceptions are refusals: the suite's UserErrors (a ValueError subclass among them)
    and file-system errors of the user's machine; built-in errors of the code are not."""
    assert refusal_line(SettingError("batch_size=0 must be at least 1")) == "batch_size=0 must be at least 1"
    assert refusal_line(MissingInputError("no such root /data")) == "no such root /data"
    assert isinstance(SettingError("x"), ValueError) and isinstance(MissingInputError("x"), FileNotFoundError)
    for bug in (ValueError("x"), KeyError("x"), FileNotFoundError(errno.ENOENT, "gone", "/tmp/x"), RuntimeError()):
        assert refusal_line(bug) is None, bug
    full = OSError(errno.ENOSPC, "No space left on device", "/runs/a/records.csv")
    assert refusal_line(full) == file_system_line(full) == (
        "cannot write /runs/a/records.csv: No space left on device (free some space or choose another folder)")
    forbidden = PermissionError(errno.EACCES, "Permission denied", "/runs")
    assert "cannot write /runs: Permission denied" in refusal_line(forbidden)
    assert issubclass(UserError, Exception) and not issubclass(UserError, ValueError)


def test_refusals_and_help_answer_before_torch_loads(tmp_path):
    """--help, --cfg job and the refusal of a setting that needs no library end the command with
    neither torch nor timm imported (what makes them answer at once), in both Hydra commands."""
    import subprocess

    code = ("import sys\n"
            "from wsol_bench.cli import bench, train\n"
            "for main, argv in ((bench.main, ['wsol-bench', '--help']), (bench.main, ['wsol-bench', '--cfg', 'job']),\n"
            "                   (bench.main, ['wsol-bench', 'target=labels', 'hydra.run.dir=r']),\n"
            "                   (bench.main, ['wsol-bench', 'sweep=grid', 'sweep.boxes=contours', 'hydra.run.dir=r']),\n"
            "                   (bench.main, ['wsol-bench', 'metric.thresholds=[0.5,2]', 'hydra.run.dir=r']),\n"
            "                   (train.main, ['wsol-bench-train', 'resume=maybe', 'out_dir=o'])):\n"
            "    sys.argv = argv\n"
            "    try:\n"
            "        main()\n"
            "    except SystemExit as exit_:\n"
            "        print('exit', exit_.code, file=sys.stderr)\n"
            "print('torch' in sys.modules, 'timm' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip().splitlines()[-1] == "False False", proc.stdout[-2000:] + proc.stderr[-2000:]
    assert [line for line in proc.stderr.splitlines() if line.startswith("exit")] == \
        ["exit 0", "exit 0", "exit 2", "exit 2", "exit 2", "exit 2"], proc.stderr
    for line in ("unknown target 'labels'; valid: predicted, label", "unknown sweep.boxes 'contours'",
                 "metric.thresholds", "resume='maybe'"):
        assert line in proc.stderr, line
