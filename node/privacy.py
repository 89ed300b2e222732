"""What a plain log line may say about a failure.

pydicom's exceptions quote the bytes they could not read (``Instead received b'DOE^JANE' ... while
parsing (0010,0010)``), and a traceback prints that message: on the paths where data from outside is
parsed, a failure is logged by its type and where it was raised, never by its message. The audit log
is where patient data may be named.
"""

from __future__ import annotations

import traceback
from pathlib import Path

FRAMES = 4  # the innermost frames: enough to find the line, too few to carry data


def failure(exc: BaseException) -> str:
    """``exc`` as its type and its innermost frames (file:line in function), its message left out."""
    frames = traceback.extract_tb(exc.__traceback__)[-FRAMES:]
    where = " < ".join(f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in reversed(frames))
    return f"{type(exc).__name__} at {where}" if where else type(exc).__name__
