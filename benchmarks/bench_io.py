"""What every benchmark script shares: writing its report (JSON + markdown side by side) and its entry point."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path

from medboost.engine.records import environment, write_json
from medboost.errors import MedboostError

#: Run folders of the benchmarks that span sessions. They sit in the work tree because a later session may get a new
#: machine: .gitignore keeps each run's ``result.json`` (its config, per-epoch history and per-case test scores, all
#: that reuse and the reports read) and drops checkpoints, logs and saved models (weights are never committed).
RUNS = Path(__file__).resolve().parent / "runs"


def write_report(stem: Path, report: dict, markdown: Callable[[dict], str]) -> Path:
    """``stem.json`` (every number) and ``stem.md`` (the tables); returns the markdown's path."""
    write_json(stem.with_suffix(".json"), report)
    md = stem.with_suffix(".md")
    md.write_text(markdown(report))
    return md


def _stored(stem: Path) -> dict:
    path = stem.with_suffix(".json")
    return json.loads(path.read_text()) if path.is_file() else {}


def growing_report(stem: Path, script: str, note: str = "") -> tuple[dict, dict[str, dict]]:
    """A tuning table that grows over invocations (a few candidates at a time): the new report header (every command
    so far, date, environment, notes) and the earlier rows by candidate."""
    previous = _stored(stem)
    commands = previous.get("commands", [previous["command"]] if "command" in previous else [])
    notes = dict.fromkeys(n for n in (previous.get("note", ""), note) if n)
    report = {
        "commands": [*commands, "python " + " ".join([script, *sys.argv[1:]])],
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(),
        "note": " ".join(notes),
    }
    return report, {r["candidate"]: r for r in previous.get("rows", [])}


def add_row(
    stem: Path, report: dict, rows: dict[str, dict], row: dict, order: Iterable[str], markdown: Callable[[dict], str]
) -> None:
    """Record one candidate's row and write the report, in ``order``, keeping the rows and commands that another
    invocation running side by side has written meanwhile (the stored file is newer than what this one read at its
    start, so its rows win for every other candidate)."""
    stored = _stored(stem)
    rows.update({other["candidate"]: other for other in stored.get("rows", [])})
    rows[row["candidate"]] = row
    report["commands"] = list(dict.fromkeys([*stored.get("commands", []), *report["commands"]]))
    report["rows"] = [rows[k] for k in order if k in rows]
    write_report(stem, report, markdown)


def run(main: Callable[[], int]) -> None:
    """Exit with ``main()``'s status; a user-facing error (a stored run made with another config, missing data, ...)
    is one message and exit status 2."""
    try:
        sys.exit(main())
    except MedboostError as err:
        sys.exit(f"error: {err}")
