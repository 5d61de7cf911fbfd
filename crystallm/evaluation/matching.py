"""Uniqueness and crystal-structure-prediction matching with pymatgen's StructureMatcher (novelty against a
reference collection: `crystallm.evaluation.reference`).

An exact pre-filter keeps the work near linear: StructureMatcher (without supercells) only matches structures
of the same reduced formula whose reduced cells (its own Niggli + primitive reduction) hold as many sites
(`match_key`), so only pairs that share both reach it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure

CSP_MATCHER_KWARGS = {"stol": 0.5, "angle_tol": 10, "ltol": 0.3}  # DESIGN.md section 5


def match_key(structure: Structure) -> tuple[str, int]:
    # StructureMatcher's own (cached) reduction, so the key agrees with what fit() compares.
    reduced = StructureMatcher._get_reduced_structure(structure, primitive_cell=True, niggli=True)
    return structure.composition.reduced_formula, len(reduced)


def check_matcher(matcher: StructureMatcher | None) -> StructureMatcher:
    matcher = matcher or StructureMatcher()
    if getattr(matcher, "_supercell", False) or getattr(matcher, "_subset", False):
        raise ValueError("the site-count pre-filter is exact only for matchers without supercells or subsets")
    return matcher


def _by_key(structures: list[Structure]) -> dict[tuple[str, int], list[int]]:
    groups: dict[tuple[str, int], list[int]] = defaultdict(list)
    for index, structure in enumerate(structures):
        groups[match_key(structure)].append(index)
    return groups


def unique_mask(structures: list[Structure], matcher: StructureMatcher | None = None) -> list[bool]:
    """True for the first structure of each StructureMatcher class, False for later duplicates.

    >>> from pymatgen.core import Lattice
    >>> a = Structure(Lattice.cubic(4.2), ["Cs", "Cl"], [[0, 0, 0], [.5, .5, .5]])
    >>> layered = Structure(Lattice.cubic(4.2), ["Cs", "Cl"], [[0, 0, 0], [.5, .5, 0]])
    >>> unique_mask([a, a.copy(), layered])
    [True, False, True]
    """
    matcher = check_matcher(matcher)
    mask = [True] * len(structures)
    for indices in _by_key(structures).values():
        kept: list[int] = []
        for index in indices:
            if any(matcher.fit(structures[index], structures[other]) for other in kept):
                mask[index] = False
            else:
                kept.append(index)
    return mask


@dataclass
class CSPResult:
    """Match rate and mean RMS (normalized by (V/n)^(1/3)) over matched targets, at n attempts."""

    attempts: int
    targets: int
    matched: int
    match_rate: float
    mean_rms: float | None


def csp_match(targets: list[Structure], predictions: list[list[Structure | None]], attempts: int,
              matcher: StructureMatcher | None = None) -> tuple[CSPResult, list[float | None]]:
    """Crystal structure prediction: a target counts as matched if any of its first `attempts` predictions
    matches it (StructureMatcher stol=0.5, angle_tol=10, ltol=0.3); its RMS is the best among those.

    Returns the summary and each target's RMS (None where unmatched).

    >>> from pymatgen.core import Lattice
    >>> a = Structure(Lattice.cubic(4.2), ["Cs", "Cl"], [[0, 0, 0], [.5, .5, .5]])
    >>> result, rms = csp_match([a], [[None, a.copy()]], attempts=1)
    >>> result.match_rate, csp_match([a], [[None, a.copy()]], attempts=2)[0].match_rate
    (0.0, 1.0)
    """
    matcher = matcher or StructureMatcher(**CSP_MATCHER_KWARGS)
    per_target: list[float | None] = []
    for target, candidates in zip(targets, predictions):
        best = None
        for candidate in candidates[:attempts]:
            if candidate is None:
                continue
            rms = matcher.get_rms_dist(target, candidate)
            if rms is not None and (best is None or rms[0] < best):
                best = float(rms[0])
        per_target.append(best)
    matched = [rms for rms in per_target if rms is not None]
    result = CSPResult(attempts, len(targets), len(matched), len(matched) / len(targets) if targets else 0.0,
                       float(np.mean(matched)) if matched else None)
    return result, per_target
