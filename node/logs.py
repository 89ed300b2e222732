"""Log lines the same way in every process of the node (the service, its receiver processes)."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
NOISY = ("pynetdicom", "apscheduler", "highdicom", "alembic")  # each narrates every step


def configure(level: int | str) -> None:
    """Log to stderr at ``level``, the libraries that narrate every step only from warnings up."""
    logging.basicConfig(level=level, format=FORMAT)
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
