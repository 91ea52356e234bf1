"""The `progress` setting: true / false as given, auto only on a terminal, anything else refused."""

from __future__ import annotations

import sys

import pytest

from wsol_bench.progress import progress_enabled


@pytest.mark.parametrize("terminal", [True, False])
def test_auto_follows_whether_stderr_is_a_terminal(monkeypatch, terminal):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    assert progress_enabled("auto") is terminal
    assert progress_enabled("AUTO") is terminal
    assert progress_enabled(None) is terminal
    assert progress_enabled(True) is True and progress_enabled(False) is False


def test_other_values_are_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"progress='maybe' is not a valid setting; use true, false or auto"):
        progress_enabled("maybe")
    with pytest.raises(ValueError, match="progress=1"):
        progress_enabled(1)
