"""Crystal structure prediction (docs/architecture.md, CSP): predictions named '<id>' or '<id>__<attempt>' are
matched against their targets with StructureMatcher; match rate and mean RMS at n attempts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pymatgen.core import Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from crystallm.diffraction.lattice_fit import fit_lattice
from crystallm.evaluation import matching
from crystallm.evaluation.scoring import ScoredStructure


@dataclass(frozen=True)
class CSPTask:
    """What `evaluate` matches predictions against: the targets (a split such as `mp20-bt/test`, or any
    collection), optionally only the ids listed in `ids_file` (`../shared/benchmarks/*.txt`), at each n of
    `attempts`; `ranking` (entry name -> a score, lower first: the relaxed energy per atom, or the disagreement
    with a powder pattern) adds `ranked n=1` (see `evaluate_csp`)."""

    targets: str
    ids_file: str | Path | None = None
    attempts: tuple[int, ...] = (1, 20)
    ranking: dict[str, float] | None = None


def csp_targets(name: str) -> str:
    """The target id of a CSP prediction named '<id>' or '<id>__<attempt>' (e.g. 'mp-1234__3').

    >>> csp_targets("mp-1234__3"), csp_targets("mp-1234")
    ('mp-1234', 'mp-1234')
    """
    return name.split("__")[0]


def evaluate_csp(records: list[ScoredStructure], targets: list[ScoredStructure], attempts: tuple[int, ...] = (1, 20),
                 ranking: dict[str, float] | None = None, num_proc: int | None = 1, ray: str | None = None) -> dict:
    """CSP match rate and mean RMS at each n in `attempts`. Predictions are grouped by target id (entry names
    '<id>' or '<id>__<k>', in input order); targets without predictions count as unmatched. With `ranking`
    (entry name -> score, e.g. relaxed energy per atom), `ranked n=1` is the match rate of each target's
    lowest-scored prediction: what a user who takes the first of the ranked attempts gets (no score: ranked
    last). Each prediction is matched once (`matching.csp_rms`, in `num_proc` processes or on `ray`)."""
    predictions: dict[str, list[tuple[str, Structure | None]]] = {}
    for r in records:
        predictions.setdefault(csp_targets(r.name), []).append((r.name, None if r.error else r.structure))
    target_structures = [t.structure for t in targets]
    groups = [predictions.get(t.name, [])[: None if ranking is not None else max(attempts)] for t in targets]
    rms = matching.csp_rms(target_structures, [[s for _, s in group] for group in groups], num_proc, ray)
    orders = {f"n={n}": ([list(zip(group, distances)) for group, distances in zip(groups, rms)], n)
              for n in attempts}
    if ranking is not None:
        orders["ranked n=1"] = ([sorted(zip(group, distances), key=lambda p: ranking.get(p[0][0], math.inf))
                                 for group, distances in zip(groups, rms)], 1)
    results = {}
    for key, (ordered, n) in orders.items():
        result, _ = matching.csp_result([[d for _, d in pairs] for pairs in ordered], n)
        results[key] = {"match_rate": result.match_rate, "mean_rms": result.mean_rms,
                        "matched": result.matched, "targets": result.targets}
    first, _ = orders["ranked n=1" if ranking is not None else f"n={min(attempts)}"]
    results["lattice n=1"] = lattice_errors([pairs[0][0][1] if pairs else None for pairs in first], target_structures)
    return results


def _conventional_lattice(structure: Structure) -> tuple[list[float], float]:
    try:
        cell = SpacegroupAnalyzer(structure, symprec=0.1).get_conventional_standard_structure()
    except ValueError:  # spglib fails on pathological cells: the cell as written
        cell = structure
    return sorted(cell.lattice.abc), structure.volume / len(structure)


def lattice_errors(predictions: list[Structure | None], targets: list[Structure]) -> dict:
    """How far each target's first prediction's cell is from the target's: mean absolute error of the three
    lattice lengths (Å; both cells in their conventional standard setting at symprec 0.1, lengths sorted, so
    axis choices do not count; with its median, which the far-off cells of wrong structures do not dominate) and
    of the volume per atom (Å³), over the targets with a parsed prediction.

    >>> from pymatgen.core import Lattice
    >>> cell = lambda a: Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), ["Na", "Cl"], [[0, 0, 0], [.5, .5, .5]])
    >>> errors = lattice_errors([cell(5.7), None], [cell(5.6), cell(5.6)])
    >>> round(errors["length_mae"], 3), errors["compared"]
    (0.1, 1)
    """
    lengths, volumes = [], []
    for predicted, target in zip(predictions, targets):
        if predicted is None:
            continue
        (predicted_abc, predicted_volume), (target_abc, target_volume) = map(_conventional_lattice,
                                                                             (predicted, target))
        lengths.append(sum(abs(p - t) for p, t in zip(predicted_abc, target_abc)) / 3)
        volumes.append(abs(predicted_volume - target_volume))
    return {"length_mae": sum(lengths) / len(lengths) if lengths else None,
            "length_median_ae": float(np.median(lengths)) if lengths else None,
            "volume_per_atom_mae": sum(volumes) / len(volumes) if volumes else None, "compared": len(lengths)}


def fit_attempts(attempted: list[tuple[str, Structure]], patterns: dict[str, np.ndarray],
                 targets: dict[str, Structure]) -> tuple[list[tuple[str, Structure]], dict]:
    """Each attempt (named `<target id>__<k>`) with its cell fitted to its target's powder pattern
    (`crystallm.diffraction.lattice_fit.fit_lattice`), and the `lattice_errors` of each target's first attempt
    before the fit, over `targets` (id -> structure, in the order the errors are taken).

    >>> from pymatgen.core import Lattice
    >>> from crystallm.diffraction.patterns import Peaks
    >>> cell = lambda a: Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), ["Na", "Cl"], [[0, 0, 0], [.5, .5, .5]])
    >>> fitted, before = fit_attempts([("x__0", cell(5.9))], {"x": Peaks.from_structure(cell(5.64)).to_profile()},
    ...                               {"x": cell(5.64)})
    >>> round(fitted[0][1].lattice.a, 2), round(before["length_mae"], 2)
    (5.64, 0.26)
    """
    first: dict[str, Structure] = {}
    for name, structure in attempted:
        first.setdefault(csp_targets(name), structure)
    before = lattice_errors([first.get(i) for i in targets], list(targets.values()))
    fitted = [(name, fit_lattice(structure, patterns[csp_targets(name)]).structure) for name, structure in attempted]
    return fitted, before
