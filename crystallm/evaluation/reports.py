"""Writers for evaluation results: JSON, JSON lines, CSV and a Markdown report (plots: `evaluation.plots`)."""

from __future__ import annotations

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
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, list(dict.fromkeys(key for row in rows for key in row)) or ["name"],
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    replace_file(Path(path), buffer.getvalue().encode())


def markdown_table(summary: dict) -> str:
    """The headline numbers of a summary as a Markdown table (also printed by `crystallm evaluate`)."""
    rows = [("entries", summary["entries"]), ("unreadable", summary["unreadable"])]
    if summary.get("skipped"):
        rows.append(("skipped (not structure files)", summary["skipped"]["files"]))
    if summary.get("parse_rate") is not None:
        rows.append(("parse rate", summary["parse_rate"]))
    rows += [(f"validity: {key}", value) for key, value in summary["validity"].items()]
    for precision, stats in summary["symmetry"].items():
        rows.append((f"P1 fraction ({precision})", stats["p1_fraction"]))
        rows.append((f"distinct space groups ({precision})", stats["distinct"]))
        if stats.get("stated_agreement") is not None:
            rows.append((f"stated = detected ({precision})", stats["stated_agreement"]))
    for key, value in summary["self_consistency"].items():
        if value is not None:
            rows.append((f"self-consistency: {key}", value))
    for key in ("uniqueness", "novelty"):
        if summary.get(key) is not None:
            rows.append((key, summary[key]))
    for group in ("wasserstein", "coverage", "csp"):
        for key, value in (summary.get(group) or {}).items():
            if isinstance(value, dict):
                for inner, number in value.items():
                    rows.append((f"{group} {key}: {inner}", number))
            else:
                rows.append((f"{group}: {key}", value))
    stability = summary.get("stability") or {}
    for key in ("relaxed", "failed", "stable_rate", "sun_rate", "median_e_above_hull", "median_rmsd",
                "core_seconds_per_structure"):
        if stability.get(key) is not None:
            rows.append((f"stability: {key.replace('_', ' ')}", stability[key]))
    for key, value in (summary.get("generation") or {}).items():
        if value and key != "seconds":  # refine seconds only when a head ran
            rows.append((f"generation: {key.replace('_', ' ')}", value))
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value:.4f} |" if isinstance(value, float) else f"| {name} | {value} |"
              for name, value in rows]
    return "\n".join(lines)


def write_markdown(summary: dict, path: str | Path) -> None:
    """A Markdown report: what was evaluated against what, then the table."""
    lines = [f"# crystallm evaluate {summary.get('input', '')}", ""]
    for key in ("reference", "test", "csp_targets", "seconds", "structures_per_second"):
        if summary.get(key) is not None:
            lines.append(f"- {key}: {summary[key]}")
    for key, note in (summary.get("stability") or {}).get("approximations", {}).items():
        lines.append(f"- stability, {key}: {note}")
    Path(path).write_text("\n".join(lines + ["", markdown_table(summary), ""]))
