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

from crystallm.evaluation.pools import ordered_map

CSP_MATCHER_KWARGS = {"stol": 0.5, "angle_tol": 10, "ltol": 0.3}  # docs/architecture.md


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


def _unique_in_group(group: tuple[StructureMatcher, list[Structure]]) -> list[bool]:
    matcher, structures = group
    kept: list[Structure] = []
    flags = []
    for structure in structures:
        flags.append(not any(matcher.fit(structure, other) for other in kept))
        if flags[-1]:
            kept.append(structure)
    return flags


def unique_mask(structures: list[Structure], matcher: StructureMatcher | None = None, num_proc: int | None = 1,
                ray: str | None = None) -> list[bool]:
    """True for the first structure of each StructureMatcher class, False for later duplicates. The groups the
    pre-filter forms are matched in `num_proc` worker processes (None: every core; `ray`: `pools.worker_pool`).

    >>> from pymatgen.core import Lattice
    >>> a = Structure(Lattice.cubic(4.2), ["Cs", "Cl"], [[0, 0, 0], [.5, .5, .5]])
    >>> layered = Structure(Lattice.cubic(4.2), ["Cs", "Cl"], [[0, 0, 0], [.5, .5, 0]])
    >>> unique_mask([a, a.copy(), layered])
    [True, False, True]
    """
    matcher = check_matcher(matcher)
    mask = [True] * len(structures)
    groups = [indices for indices in _by_key(structures).values() if len(indices) > 1]
    work = [(matcher, [structures[i] for i in indices]) for indices in groups]
    for indices, group_flags in zip(groups, ordered_map(_unique_in_group, work, num_proc, ray)):
        for index, flag in zip(indices, group_flags):
            mask[index] = flag
    return mask


@dataclass
class CSPResult:
    """Match rate and mean RMS (normalized by (V/n)^(1/3)) over matched targets, at n attempts."""

    attempts: int
    targets: int
    matched: int
    match_rate: float
    mean_rms: float | None


def _rms_to_target(pair: tuple[Structure, list[Structure | None]]) -> list[float | None]:
    target, candidates = pair
    matcher = StructureMatcher(**CSP_MATCHER_KWARGS)
    distances = [None if c is None else matcher.get_rms_dist(target, c) for c in candidates]
    return [None if d is None else float(d[0]) for d in distances]


def csp_rms(targets: list[Structure], predictions: list[list[Structure | None]],
            num_proc: int | None = 1, ray: str | None = None) -> list[list[float | None]]:
    """Each prediction's RMS distance to its target (StructureMatcher stol=0.5, angle_tol=10, ltol=0.3; normalized
    by (V/n)^(1/3)), None where it does not match or is missing. Targets are matched in `num_proc` worker
    processes (None: every core; `ray`: see `pools.worker_pool`), each pair once whatever n is asked later.

    >>> from pymatgen.core import Lattice
    >>> a = Structure(Lattice.cubic(4.2), ["Cs", "Cl"], [[0, 0, 0], [.5, .5, .5]])
    >>> stretched = Structure(Lattice.tetragonal(4.2, 6.3), ["Cs", "Cl"], [[0, 0, 0], [.5, .5, .5]])
    >>> csp_rms([a], [[None, stretched, a.copy()]])
    [[None, None, 0.0]]
    """
    return list(ordered_map(_rms_to_target, zip(targets, predictions), num_proc, ray, chunksize=4))


def csp_result(rms: list[list[float | None]], attempts: int) -> tuple[CSPResult, list[float | None]]:
    """Crystal structure prediction at n=`attempts` from `csp_rms`'s distances (each target's predictions in the
    order they are taken): a target counts as matched if any of its first `attempts` predictions matches it; its
    RMS is the best among those. Returns the summary and each target's RMS (None where unmatched).

    >>> result, best = csp_result([[None, 0.2, 0.1], [None]], attempts=2)
    >>> result.match_rate, best
    (0.5, [0.2, None])
    """
    per_target = [min((d for d in distances[:attempts] if d is not None), default=None) for distances in rms]
    matched = [d for d in per_target if d is not None]
    result = CSPResult(attempts, len(rms), len(matched), len(matched) / len(rms) if rms else 0.0,
                       float(np.mean(matched)) if matched else None)
    return result, per_target
