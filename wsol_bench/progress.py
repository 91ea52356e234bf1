"""The `progress` setting of both commands: whether tqdm progress bars are drawn."""

from __future__ import annotations

import sys

from wsol_bench.errors import SettingError


def progress_enabled(setting: bool | str | None) -> bool:
    """true / false as given; auto (or null) draws bars only when stderr is a terminal, so the
    log file of a batch job does not fill with bar redraws."""
    if setting is None or (isinstance(setting, str) and setting.lower() == "auto"):
        return sys.stderr.isatty()
    if isinstance(setting, bool):
        return setting
    raise SettingError(f"progress={setting!r} is not a valid setting; use true, false or auto")
