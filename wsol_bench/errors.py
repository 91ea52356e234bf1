"""The suite's one error model: every refusal of a user's settings, files or machine is a
`UserError`, which the commands print as one line (exit code 2); any other exception raised
by the suite's own code is a bug and keeps its traceback.

The subclasses also derive from the built-in exception a Python caller would expect
(`ValueError` for a bad value, `FileNotFoundError` for an absent path, `ImportError` for a
missing library), so code that calls the library and catches those keeps working. This module
imports nothing heavy: the commands use it before torch is loaded.

`counted` and `agreeing` word the counts in every message, note and log line ("1 map is",
"2 maps are"), so a count never disagrees with its noun or verb."""

from __future__ import annotations

import errno


class UserError(Exception):
    """A refusal caused by the user's settings, files or machine; its message names the setting
    or file and the fix, and the commands print it as one line."""


class SettingError(UserError, ValueError):
    """A configuration value or argument the suite cannot use (out of range, unknown name,
    incompatible with another setting)."""


class InputFileError(UserError, ValueError):
    """A file or dataset the suite cannot read or use: unreadable, damaged, of the wrong kind or
    layout; the message names the file."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder the settings name that does not exist; the message names it."""


class MissingLibraryError(UserError, ImportError):
    """An optional library a setting needs is not installed; the message gives the install command."""


class DiskFullError(UserError, OSError):
    """A write that found no space left on its disk (or quota); the message names the file, the
    space free there and the space it needed, and what was kept. Its errno is ENOSPC and its
    filename the file, as for the OSError it replaces."""

    def __init__(self, message: str, filename: str) -> None:
        super().__init__(errno.ENOSPC, message, filename)
        self.message = message

    def __str__(self) -> str:
        return self.message


class FolderInUseError(UserError):
    """A run folder or map-store shard another process is writing; the message names the holder."""


def agreeing(count: float, singular: str, plural: str | None = None) -> str:
    """The form of a noun or verb that agrees with `count`: `singular` for exactly 1, else
    `plural` (default: `singular` + "s"). agreeing(1, "is", "are") == "is"."""
    if count == 1:
        return singular
    return plural if plural is not None else singular + "s"


def counted(count: float, singular: str, plural: str | None = None) -> str:
    """`count` (thousands separated) and the noun that agrees with it: counted(1, "map") ==
    "1 map", counted(49997, "item") == "49,997 items", counted(2, "box", "boxes") == "2 boxes"."""
    number = f"{int(count):,}" if float(count).is_integer() else f"{count:,}"
    return f"{number} {agreeing(count, singular, plural)}"
