"""Which log lines reach the console: every line of wsol-bench's own loggers, and the other
libraries' lines only from WARNING up.

timm, Hydra, torch and other libraries log at INFO (timm's two "Loading pretrained weights"
lines, a sweep's launch lines), which would come before every table. conf/config.yaml puts
`QuietLibraries` on the console handler of Hydra's job logging and of Hydra's own logging, with
the run's `verbose` setting: `verbose=true` lets every line through. Hydra builds its handlers
again for every job, so the filter is part of their configuration, not added to them once.
The log file gets no filter: the job's log keeps every line.
"""

from __future__ import annotations

import logging

OWN_LOGGER = "wsol_bench"


class QuietLibraries(logging.Filter):
    """Lets through every record of wsol-bench's own loggers and the other loggers' records
    from WARNING up; with `verbose`, every record."""

    def __init__(self, verbose: bool = False) -> None:
        super().__init__()
        self.verbose = bool(verbose)

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether the console shows `record`."""
        if self.verbose or record.levelno >= logging.WARNING:
            return True
        return record.name == OWN_LOGGER or record.name.startswith(OWN_LOGGER + ".")
