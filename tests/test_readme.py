"""Every command and code block of the README works as written.

A command in a ```bash block either runs here, on a few synthetic images (the test adds
`dataset.params.num_images`, the run folder and the map cache, nothing else), or carries a
`# needs: <what>` comment (data, a GPU, SLURM, the network); a `wsol-bench` command that
needs something still has to compose: its groups, keys and values must exist. The set-up
commands are run by `.ci/run` as written. The ```python blocks are executed."""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import open_dict

from wsol_bench.config.keys import check_known_keys

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
NEEDS = re.compile(r"#\s*needs:\s*\S")
SMALL = "dataset.params.num_images=3"
COMMANDS = ("wsol-bench", "wsol-bench-report", "wsol-bench-train", "torchrun", "pip", "python")


def code_blocks(language: str, text: str = README) -> list[tuple[str, str]]:
    """(section heading, block text) of every fenced block of `language`, in order."""
    blocks, heading = [], ""
    for part in re.split(r"(^```\w*\n.*?^```)", text, flags=re.MULTILINE | re.DOTALL):
        if part.startswith("```"):
            if part.startswith(f"```{language}\n"):
                blocks.append((heading, part[len(language) + 4:-3]))
        else:
            headings = re.findall(r"^#+ (.+)$", part, flags=re.MULTILINE)
            heading = headings[-1] if headings else heading
    return blocks


def readme_commands() -> list[tuple[str, str]]:
    """(section, line) of every command in the README's bash blocks but the set-up commands."""
    found = []
    for heading, block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#") and not heading.startswith("Set-up"):
                found.append((heading, line.strip()))
    return found


def _arguments(line: str) -> list[str]:
    """The command's words without its trailing comment."""
    return shlex.split(line, comments=True)


RUNNABLE = [line for _, line in readme_commands() if not NEEDS.search(line)]
NEEDING = [line for _, line in readme_commands() if NEEDS.search(line)]


def test_the_readme_is_short_and_every_command_is_accounted_for():
    """Under about 250 lines; every command is a suite command (run or composed below); the set-up
    block holds the two numbered commands that .ci/run extracts."""
    assert len(README.splitlines()) <= 250
    assert len(RUNNABLE) >= 8 and len(NEEDING) >= 4
    for line in RUNNABLE + NEEDING:
        assert _arguments(line)[0] in COMMANDS, line
    setup = [block for heading, block in code_blocks("bash") if heading.startswith("Set-up")]
    assert "# 1. " in setup[0] and "# 2. " in setup[0]


@pytest.mark.parametrize("line", [line for line in NEEDING if _arguments(line)[0] in ("wsol-bench", "torchrun")])
def test_a_command_that_needs_data_or_a_gpu_composes(line):
    """The command's settings compose into a configuration whose every key the schema knows."""
    words = _arguments(line)
    if words[0] == "torchrun":
        words = words[words.index("wsol_bench"):]
    overrides = [w for w in words[1:] if w not in ("-m", "--multirun")]
    for job in _jobs(overrides):
        with initialize_config_module(config_module="wsol_bench.conf", version_base="1.3"):
            cfg = compose(config_name="config", overrides=job, return_hydra_config=True)
        with open_dict(cfg):
            del cfg["hydra"]
        check_known_keys(cfg)


def _jobs(overrides: list[str]) -> list[list[str]]:
    """The overrides of every job of a multirun (each sweep value on its own), as Hydra's sweeper
    would launch them; a single run is one job."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
               else [o.input_line] for o in parsed]
    return [list(job) for job in itertools.product(*choices)]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Two finished runs on 3 synthetic images, for the commands that take run folders."""
    from conftest import command_in_process

    root = tmp_path_factory.mktemp("readme_runs")
    runs = {}
    for name, methods in (("RUN", "[agcam,rollout,center]"), ("RUN_B", "[rollout,center]")):
        result = command_in_process("wsol-bench", [f"method={methods}", SMALL, "gallery_images=1",
                                                   f"store.root={root / 'cache'}", f"hydra.run.dir={root / name}"],
                                    root)
        assert result.returncode == 0, result.stderr
        runs[name] = root / name
    return runs


def _small(words: list[str], out: Path) -> list[str]:
    """The command's own overrides on 3 images, its run or sweep folder and map cache in `out`."""
    kept = [w for w in words if not w.startswith("dataset.params.num_images=")]
    folder = "hydra.sweep.dir" if "-m" in kept else "hydra.run.dir"
    return [*kept, SMALL, "gallery_images=1", f"store.root={out / 'cache'}", f"{folder}={out / 'run'}"]


@pytest.mark.parametrize("line", RUNNABLE)
def test_a_readme_command_runs(line, tiny_runs, tmp_path, command):
    """The command as written (on 3 images) ends with exit code 0 and says where its outputs are."""
    words = _arguments(line)
    program, args = words[0], words[1:]
    # a run gets its small settings; a report command gets the run folders its words name
    args = _small(args, tmp_path) if program == "wsol-bench" else [str(tiny_runs.get(w, w)) for w in args]
    result = command(program, args, tmp_path)
    assert result.returncode == 0, (line, result.stdout[-2000:], result.stderr[-2000:])
    assert str(tmp_path) in result.stdout or str(tiny_runs["RUN"]) in result.stdout, result.stdout[-2000:]


GUIDE = (REPO / "docs" / "guide.md").read_text()


@pytest.mark.parametrize("block", [b for _, b in code_blocks("python") + code_blocks("python", GUIDE)])
def test_a_python_example_runs(block, tmp_path, monkeypatch):
    """Every Python example of the README and the user guide runs as written."""
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {"__name__": "__readme__"})
