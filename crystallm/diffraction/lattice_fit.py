"""Fitting a structure's cell to a given powder pattern: the peak positions of a pattern pin down the lattice, so a
generated attempt of the right structure type, whose cell is a few percent off, gets the cell the pattern says.

This is a Pawley-like refinement of the lattice alone, in the attempt's crystal system (a cubic cell keeps one
length, a monoclinic one four parameters): the attempt's reflections (Miller indices and intensities, computed
once for its conventional cell) move with the cell, and the fit minimizes how far each strong computed
reflection lies from the nearest observed peak and each observed peak from the nearest computed reflection
(intensity-weighted, each distance capped at 1 degree). A scan of the isotropic scale (±15%) comes first, so a
cell some percent off finds its basin; then Nelder-Mead refines every free parameter. Atom positions
(fractional) stay as generated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pymatgen.core import Lattice, Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from crystallm.diffraction.patterns import GRID, MAX_VOLUME, TWO_THETA_RANGE, WAVELENGTH

STRONGEST_REFLECTIONS = 40  # the computed reflections the fit places
PEAK_PROMINENCE = 0.01  # an observed peak stands this far above its surroundings (profiles scale to 1)
DISTANCE_CAP = 1.0  # degrees: a reflection far from every peak costs this much, however far
SCALE_SCAN = np.linspace(0.85, 1.15, 301)
# Reflections up to this angle: those a cell 15% smaller brings onto the grid (up to 90 degrees) come from 109.
REFLECTIONS_TWO_THETA = (1.0, 110.0)

# The free cell parameters of each crystal system, as indices into (a, b, c, alpha, beta, gamma): the others
# follow from them (equal lengths) or stay as they are (fixed angles).
_FREE = {"cubic": (0,), "tetragonal": (0, 2), "hexagonal": (0, 2), "trigonal": (0, 2), "orthorhombic": (0, 1, 2),
         "monoclinic": (0, 1, 2, 4), "triclinic": (0, 1, 2, 3, 4, 5)}
_LENGTHS = {"cubic": 1, "tetragonal": 2, "hexagonal": 2, "trigonal": 2, "orthorhombic": 3, "monoclinic": 3,
            "triclinic": 3}


@dataclass(frozen=True)
class LatticeFit:
    """A structure with its cell fitted to a pattern (its conventional cell), its crystal system, and the misfit
    of the reflections to the pattern's peaks before and after (the fit's cost: a squared distance in degrees²,
    intensity-weighted). `fitted` is False for a cell over MAX_VOLUME, given back as it was (misfits NaN)."""

    structure: Structure
    crystal_system: str
    misfit_before: float
    misfit_after: float
    fitted: bool = True


def _cell(system: str, free: np.ndarray, start: Lattice) -> Lattice:
    parameters = list(start.parameters)
    for index, value in zip(_FREE[system], free):
        parameters[index] = value
    if system == "cubic":
        parameters[1] = parameters[2] = parameters[0]
    elif system in ("tetragonal", "hexagonal", "trigonal"):
        parameters[1] = parameters[0]
    return Lattice.from_parameters(*parameters)


def fit_lattice(structure: Structure, given: np.ndarray) -> LatticeFit:
    """Fit the cell of `structure` (in its conventional setting, crystal system at symprec 0.1) to the peaks of the
    `given` profile (on `patterns.GRID`, Cu Kα).

    >>> from crystallm.diffraction.patterns import Peaks
    >>> nacl = lambda a: Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), ["Na", "Cl"], [[0, 0, 0], [.5] * 3])
    >>> fit = fit_lattice(nacl(5.45), Peaks.from_structure(nacl(5.64)).to_profile())
    >>> round(fit.structure.lattice.a, 2), fit.crystal_system, fit.misfit_after < fit.misfit_before
    (5.64, 'cubic', True)
    """
    from pymatgen.analysis.diffraction.xrd import WAVELENGTHS, XRDCalculator
    from scipy.optimize import minimize
    from scipy.signal import find_peaks

    try:
        analyzer = SpacegroupAnalyzer(structure, symprec=0.1)
        cell, system = analyzer.get_conventional_standard_structure(), analyzer.get_crystal_system()
    except ValueError:  # spglib fails on pathological cells: every parameter free
        cell, system = structure, "triclinic"
    if cell.volume > MAX_VOLUME:
        return LatticeFit(cell, system, float("nan"), float("nan"), fitted=False)
    pattern = XRDCalculator(WAVELENGTH).get_pattern(cell, two_theta_range=REFLECTIONS_TWO_THETA)
    # (h, k, l) of each reflection family; hexagonal cells give (h, k, i, l)
    miller = np.array([[family[0]["hkl"][0], family[0]["hkl"][1], family[0]["hkl"][-1]] for family in pattern.hkls],
                      dtype=float).reshape(-1, 3)
    weights = np.asarray(pattern.y, dtype=float)
    strongest = np.argsort(-weights)[:STRONGEST_REFLECTIONS]
    miller, weights = miller[strongest], weights[strongest]
    found, _ = find_peaks(given, prominence=PEAK_PROMINENCE)
    observed, observed_weights = GRID[found], np.asarray(given, dtype=float)[found]
    low, high = TWO_THETA_RANGE

    def misfit(free: np.ndarray) -> float:
        try:
            lattice = _cell(system, free, cell.lattice)
        except ValueError:  # angles that make no cell
            return np.inf
        if not np.all(np.isfinite(lattice.abc)) or min(lattice.abc) < 1.0 or not len(observed):
            return np.inf
        spacing = np.linalg.norm(miller @ lattice.reciprocal_lattice_crystallographic.matrix, axis=1)
        two_theta = np.degrees(2 * np.arcsin(np.clip(WAVELENGTHS[WAVELENGTH] * spacing / 2, 0.0, 1.0)))
        inside = (two_theta > low) & (two_theta < high)
        if not inside.any():
            return np.inf
        distances = np.abs(two_theta[inside][:, None] - observed[None, :])
        computed_to_observed = np.minimum(distances.min(axis=1), DISTANCE_CAP) ** 2
        observed_to_computed = np.minimum(distances.min(axis=0), DISTANCE_CAP) ** 2
        return float(computed_to_observed @ weights[inside] / weights[inside].sum()
                     + observed_to_computed @ observed_weights / observed_weights.sum())

    start = np.array([cell.lattice.parameters[i] for i in _FREE[system]], dtype=float)

    def scaled(scale: float) -> np.ndarray:
        free = start.copy()
        free[:_LENGTHS[system]] *= scale
        return free

    best_scale = min(SCALE_SCAN, key=lambda scale: misfit(scaled(scale)))
    result = minimize(misfit, scaled(best_scale), method="Nelder-Mead",
                      options={"xatol": 1e-4, "fatol": 1e-8, "maxiter": 400 * len(start)})
    before = misfit(start)
    free = result.x if result.fun <= before else start
    fitted = Structure(_cell(system, free, cell.lattice), cell.species, cell.frac_coords)
    return LatticeFit(fitted, system, before, min(float(result.fun), before))
