"""What every study script writes: rows appended to a CSV as runs finish, and a write-up's section
generated between two markers."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any


def append_rows(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Append ``rows`` to the CSV at ``path`` (with a header if it is new) and sync it to disk, so
    an interrupted grid keeps every finished run."""
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="raise")
        if new:
            writer.writeheader()
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())


def write_generated(doc: Path, text: str, begin: str, end: str, title: str) -> None:
    """Replace what stands between the ``begin`` and ``end`` markers of ``doc`` with ``text`` (a new
    page titled ``title`` when ``doc`` does not exist); the hand-written rest stays as it is."""
    old = doc.read_text() if doc.exists() else f"# {title}\n\n{begin}\n{end}\n"
    if begin not in old or end not in old:
        raise SystemExit(f"{doc} lacks the GENERATED markers")
    head, rest = old.split(begin, 1)
    doc.write_text(f"{head}{begin}\n\n{text}\n{end}{rest.split(end, 1)[1]}")
