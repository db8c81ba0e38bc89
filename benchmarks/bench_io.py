"""What every benchmark script shares: writing its report (JSON + markdown side by side) and its entry point."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from medboost.engine.records import write_json
from medboost.errors import MedboostError


def write_report(stem: Path, report: dict, markdown: Callable[[dict], str]) -> Path:
    """``stem.json`` (every number) and ``stem.md`` (the tables); returns the markdown's path."""
    write_json(stem.with_suffix(".json"), report)
    md = stem.with_suffix(".md")
    md.write_text(markdown(report))
    return md


def run(main: Callable[[], int]) -> None:
    """Exit with ``main()``'s status; a user-facing error (a stored run made with another config, missing data, ...)
    is one message and exit status 2."""
    try:
        sys.exit(main())
    except MedboostError as err:
        sys.exit(f"error: {err}")
