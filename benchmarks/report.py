"""What every benchmark does with its figures besides printing them."""

import json
from pathlib import Path


def write_report(path: str | Path | None, report: dict) -> None:
    """Write `report` as JSON to `path` (its folder made), when a path is given (--out)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2))
