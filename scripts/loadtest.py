"""Entry point: `python scripts/loadtest.py ...` runs the load generator, llamatron_tools/loadtest.py
(also `llamatron loadtest ...` and `python -m llamatron_tools.loadtest ...`); see there for the flags."""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script or loaded by path: the repository root holds the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llamatron_tools.loadtest import main  # noqa: E402

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
