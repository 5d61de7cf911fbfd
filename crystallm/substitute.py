"""`crystallm substitute`: a known crystal in, the ranked element substitutions out, as CIFs and a table, each
optionally relaxed by CHGNet and placed on the approximate hull (the stability protocol's code)."""

from __future__ import annotations

import csv
from pathlib import Path

from pymatgen.core import Structure

from crystallm.evaluation.relaxation import RelaxationSettings, stability_records
from crystallm.generation.substitution import Substitution, rank_substitutions
from crystallm.io import cif


def write_substitutions(model, tokenizer, structure: Structure | str, out: str | Path, element: str | None = None,
                        sites: list[int] | None = None, top: int = 10, charge_neutral: bool = False,
                        relaxation: RelaxationSettings | None = None, progress: bool = True) -> list[dict]:
    """Rank substitutions (`rank_substitutions`) and write them to the folder `out`: `NN-<formula>.cif` (the
    relaxed structure when relaxed), `candidates.csv` (rank, element, log-probability, formula, and with
    `relaxation` the CHGNet energy and E_hull; `stability.jsonl` keeps the relaxations, so a rerun resumes).
    Returns the table's rows.

    >>> import tempfile
    >>> from pymatgen.core import Lattice
    >>> from crystallm.generation.sampling import load_generator
    >>> model, tokenizer = load_generator()
    >>> nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [.5, .5, .5]])
    >>> rows = write_substitutions(model, tokenizer, nacl, tempfile.mkdtemp(), element="Cl", top=2)
    >>> [row["rank"] for row in rows], rows[0]["replaced"]
    ([1, 2], 'Cl')
    """
    candidates: list[Substitution] = rank_substitutions(model, tokenizer, structure, element, sites, top,
                                                        charge_neutral)
    out = Path(out)  # made once the input has passed every check: a refused input leaves no folder
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"rank": rank, "replaced": c.replaced, "element": c.element, "formula": c.formula,
             "log_probability": round(c.log_probability, 4), "cif": f"{rank:02d}-{c.formula}.cif"}
            for rank, c in enumerate(candidates, 1)]
    structures = {row["cif"]: c.structure for row, c in zip(rows, candidates)}
    if relaxation is not None:
        results = stability_records([(row["cif"], c.structure) for row, c in zip(rows, candidates)],
                                    out / "stability.jsonl", relaxation, num_proc=1, progress=progress)
        for row, result in zip(rows, results):
            row |= {"relax_error": result["error"],
                    "energy_per_atom": None if result["error"] else round(result["energy_per_atom"], 4),
                    "e_above_hull": None if result["error"] else round(result["e_above_hull"], 4)}
            if not result["error"]:
                structures[row["cif"]] = Structure.from_dict(result["relaxed"])
    for name, candidate in structures.items():
        (out / name).write_text(cif.structure_to_cif(candidate))
    with open(out / "candidates.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["rank"])
        writer.writeheader()
        writer.writerows(rows)
    return rows
