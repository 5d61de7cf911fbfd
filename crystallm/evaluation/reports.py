"""Writers for evaluation results: JSON, a Markdown report, and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

if TYPE_CHECKING:  # for annotations only: scoring's readers use this module's JSON-lines reader
    from crystallm.evaluation.scoring import ScoredStructure


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


def write_plots(records: list[ScoredStructure], reference: list[ScoredStructure] | None,
                directory: str | Path) -> list[Path]:
    """Space-group histogram, density and element-count distributions vs reference, validity breakdown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    scored = [r for r in records if not r.error]
    written = []

    def save(figure, name):
        path = directory / name
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)

    figure, axis = plt.subplots(figsize=(9, 3.2))
    groups = [r.space_group_0_1 or 1 for r in scored]
    axis.hist(groups, bins=np.arange(0.5, 231.5, 1.0), color="tab:blue", label="evaluated")
    if reference:
        axis.hist([r.space_group_0_1 or 1 for r in reference], bins=np.arange(0.5, 231.5, 1.0),
                  histtype="step", color="black", density=False,
                  weights=np.full(len(reference), len(scored) / max(1, len(reference))), label="reference (scaled)")
    axis.set(xlabel="space group number (spglib, symprec 0.1)", ylabel="structures", xlim=(0, 231))
    axis.legend()
    save(figure, "space_groups.png")

    for key, label, name in (("density", "density (g/cm$^3$)", "density.png"),
                             ("n_elements", "number of elements", "num_elements.png")):
        figure, axis = plt.subplots(figsize=(5, 3.2))
        values = [getattr(r, key) for r in scored if np.isfinite(getattr(r, key))]
        bins = np.arange(0.5, 9.5, 1.0) if key == "n_elements" else 40
        axis.hist(values, bins=bins, density=True, alpha=0.6, label="evaluated")
        if reference:
            axis.hist([getattr(r, key) for r in reference], bins=bins, density=True, histtype="step", color="black",
                      label="reference")
        axis.set(xlabel=label, ylabel="share")
        axis.legend()
        save(figure, name)

    figure, axis = plt.subplots(figsize=(5, 3.2))
    counts = {"unreadable": len(records) - len(scored),
              "structurally invalid": sum(not r.structural_valid for r in scored),
              "compositionally invalid": sum(r.structural_valid and not r.compositional_valid for r in scored),
              "valid": sum(r.valid for r in scored)}
    axis.barh(list(counts), list(counts.values()), color=["grey", "tab:red", "tab:orange", "tab:green"])
    axis.set(xlabel="entries")
    save(figure, "validity.png")
    return written
