"""How every command logs: the full record at INFO for log files, the console only warnings and olivepress's own
progress lines (everything with --verbose)."""

from __future__ import annotations

import logging

log = logging.getLogger("olivepress")


def console_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda record: verbose or record.levelno >= logging.WARNING or record.name == "olivepress")
