"""Each trial's log lines in its own ``train.log``, and off the console while trials run.

Trials may run in parallel threads of one process (``--jobs``), so a trial's lines
are told apart by the thread that logged them.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path


class TrialLogs(logging.Handler):
    """Sends the package's log lines from each trial's thread to that trial's
    ``train.log``, and (``quiet_console``) keeps all but warnings off the console,
    where the progress bar is."""

    def __init__(self) -> None:
        super().__init__()
        self.files: dict[int, logging.Handler] = {}

    def emit(self, record: logging.LogRecord) -> None:
        handler = self.files.get(record.thread or 0)
        if handler is not None:
            handler.handle(record)

    def shown(self, record: logging.LogRecord) -> bool:
        return record.thread not in self.files or record.levelno >= logging.WARNING

    @contextlib.contextmanager
    def to(self, path: Path) -> Iterator[None]:
        """While the block runs, this thread's log lines go to ``path``."""
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        ident = threading.get_ident()
        self.files[ident] = handler
        try:
            yield
        finally:
            del self.files[ident]
            handler.close()

    @contextlib.contextmanager
    def quiet_console(self) -> Iterator[None]:
        """Attaches the handler to the package's logger, at INFO, and filters the
        console's handlers (the root logger's) while the block runs."""
        package = logging.getLogger("twotower")
        level, console = package.level, list(logging.getLogger().handlers)
        package.setLevel(logging.INFO)
        package.addHandler(self)
        for handler in console:
            handler.addFilter(self.shown)
        try:
            yield
        finally:
            for handler in console:
                handler.removeFilter(self.shown)
            package.removeHandler(self)
            package.setLevel(level)
