"""Writers for evaluation results: JSON, JSON lines and CSV (the Markdown report: `evaluation.metrics`; plots:
`evaluation.plots`)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Iterator


def write_json(summary: dict, path: str | Path) -> None:
    """The summary as indented JSON with stable (sorted) keys, replaced atomically (readers never see half)."""
    replace_file(Path(path), json.dumps(summary, indent=1, sort_keys=True, default=str).encode())


def replace_file(path: Path, content: bytes) -> None:
    """Write `content` to a scratch file beside `path`, then move it into place: `path` is always whole."""
    scratch = path.with_name(path.name + ".partial")
    scratch.write_bytes(content)
    scratch.replace(path)


def write_json_lines(rows: list[dict], path: str | Path) -> None:
    """Rows as a JSON-lines file, replaced atomically."""
    replace_file(Path(path), "".join(json.dumps(row) + "\n" for row in rows).encode())


def read_json_lines(path: str | Path) -> Iterator[dict]:
    """The records of a JSON-lines file written as results come (a journal, a cache); a last line cut short by a
    kill ends them. A missing file has none.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "a.jsonl"
    >>> _ = path.write_text('{"a": 1}\\n{"a": 2}\\n{"a": ')
    >>> [r["a"] for r in read_json_lines(path)]
    [1, 2]
    """
    path = Path(path)
    if not path.exists():
        return
    for line in path.read_text().splitlines():
        try:
            yield json.loads(line)
        except ValueError:
            break


def write_csv(rows: list[dict], path: str | Path) -> None:
    """Rows as CSV (columns in order of first appearance), replaced atomically.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "a.csv"
    >>> write_csv([{"rank": 1, "name": "x"}, {"rank": 2, "name": "y", "note": "z"}], path)
    >>> path.read_text().splitlines()
    ['rank,name,note', '1,x,', '2,y,z']
    """
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, list(dict.fromkeys(key for row in rows for key in row)) or ["name"],
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    replace_file(Path(path), buffer.getvalue().encode())
