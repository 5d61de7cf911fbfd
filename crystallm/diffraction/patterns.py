"""Powder X-ray diffraction patterns for pattern-conditioned generation (Cu Kα, 2θ from 5 to 90 degrees).

A pattern reaches the model as a *profile*: intensities on the fixed 2θ grid `GRID` (0.1-degree bins), scaled to
a maximum of 1. Computed patterns come from pymatgen's `XRDCalculator` as peaks (`Peaks`) and are broadened into
a profile, with the degradations of measured patterns in training (`degraded_profile`: peak width, zero shift,
preferred orientation, background and noise). A measured pattern comes from a file (`PowderPattern.from_file`)
and is interpolated onto the grid. `agreement` compares two profiles (an Rwp-like figure).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pymatgen.core import Structure

from crystallm.errors import CrystaLLMInputError
from crystallm.io import cif

WAVELENGTH = "CuKa"  # pymatgen's Cu Kα: 1.54184 Å, the weighted mean of Kα1 and Kα2
TWO_THETA_RANGE = (5.0, 90.0)
STEP = 0.1
GRID = np.arange(TWO_THETA_RANGE[0] + STEP / 2, TWO_THETA_RANGE[1], STEP)  # bin centres, 850 of them
DEFAULT_FWHM = 0.15  # degrees: the peak width of a computed profile (a laboratory diffractometer's)
# A file must cover this much of the grid: less is a pattern in other units or of another wavelength.
MIN_COVERAGE = 30.0
PATTERN_SUFFIXES = (".xy", ".xye", ".csv", ".txt", ".dat")
# Larger cells' patterns are not computed (nor their cells fitted): their reflections, as many as the volume
# times the reciprocal sphere's, cost minutes and gigabytes; the corpus's conventional cells stay far below.
MAX_VOLUME = 5000.0  # Å³
AGREEMENT_SMOOTHING = 1.0  # degrees: `agreement` compares profiles at this resolution


@dataclass(frozen=True)
class Peaks:
    """A structure's computed diffraction peaks: 2θ (degrees), intensity (largest 100) and, for preferred
    orientation, the unit direction of each peak's first reflection in Cartesian reciprocal space."""

    two_theta: np.ndarray
    intensity: np.ndarray
    direction: np.ndarray  # (peaks, 3)

    @classmethod
    def from_structure(cls, structure: Structure) -> Peaks:
        """The peaks pymatgen's `XRDCalculator` finds for Cu Kα over the grid's 2θ range.

        >>> from pymatgen.core import Lattice
        >>> nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [.5, .5, .5]])
        >>> peaks = Peaks.from_structure(nacl)
        >>> round(float(peaks.two_theta[peaks.intensity.argmax()]), 1)  # the (200) reflection
        31.7
        """
        from pymatgen.analysis.diffraction.xrd import XRDCalculator

        pattern = XRDCalculator(WAVELENGTH).get_pattern(structure, two_theta_range=TWO_THETA_RANGE)
        reciprocal = structure.lattice.reciprocal_lattice.matrix
        # (h, k, l) of each peak's first reflection; hexagonal cells give (h, k, i, l)
        miller = np.array([[family[0]["hkl"][0], family[0]["hkl"][1], family[0]["hkl"][-1]]
                           for family in pattern.hkls], dtype=float).reshape(-1, 3)
        directions = miller @ reciprocal
        directions /= np.linalg.norm(directions, axis=1, keepdims=True).clip(min=1e-12)
        return cls(np.asarray(pattern.x, dtype=float), np.asarray(pattern.y, dtype=float), directions)

    def to_row(self) -> dict[str, list[float]]:
        """The peaks as a dataset row's columns (`data.add_diffraction_peaks`)."""
        return {"peak_two_theta": self.two_theta.tolist(), "peak_intensity": self.intensity.tolist(),
                "peak_direction": self.direction.ravel().tolist()}

    @classmethod
    def from_row(cls, row: dict) -> Peaks:
        """The peaks of a dataset row that `to_row` wrote."""
        return cls(np.asarray(row["peak_two_theta"], dtype=float), np.asarray(row["peak_intensity"], dtype=float),
                   np.asarray(row["peak_direction"], dtype=float).reshape(-1, 3))

    def to_profile(self, fwhm: float = DEFAULT_FWHM, zero_shift: float = 0.0,
                   intensity: np.ndarray | None = None) -> np.ndarray:
        """Gaussian peaks of full width at half maximum `fwhm` (degrees), moved by `zero_shift`, on the grid,
        scaled to a maximum of 1 (all zeros without peaks)."""
        sigma = fwhm / (2 * np.sqrt(2 * np.log(2)))
        heights = self.intensity if intensity is None else intensity
        profile = (heights[:, None] * np.exp(-0.5 * ((GRID[None, :] - self.two_theta[:, None] - zero_shift)
                                                     / sigma) ** 2)).sum(axis=0)
        return _unit_maximum(profile)


def _unit_maximum(profile: np.ndarray) -> np.ndarray:
    peak = profile.max() if profile.size else 0.0
    return (profile / peak if peak > 0 else profile).astype(np.float32)


def degraded_profile(peaks: Peaks, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """A profile as a measurement would give it, degradations drawn from `rng` and scaled by `strength`
    (0: the clean computed profile): peak width 0.1-0.4 degrees, a zero shift up to 0.1 degrees, March-Dollase
    preferred orientation along a random direction (r from 0.7 to 1), a decaying background up to 10% and
    noise up to 2% of the largest peak.

    >>> from pymatgen.core import Lattice
    >>> nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [.5, .5, .5]])
    >>> peaks = Peaks.from_structure(nacl)
    >>> clean = degraded_profile(peaks, np.random.default_rng(0), strength=0)
    >>> measured = degraded_profile(peaks, np.random.default_rng(0))
    >>> bool(np.allclose(clean, peaks.to_profile())), agreement(clean, measured) > 0
    (True, True)
    """
    if strength == 0:
        return peaks.to_profile()
    fwhm = DEFAULT_FWHM + strength * rng.uniform(-0.05, 0.25)
    zero_shift = strength * rng.uniform(-0.1, 0.1)
    ratio = 1.0 - strength * rng.uniform(0.0, 0.3)  # March-Dollase r; 1 is no texture
    axis = rng.normal(size=3)
    cosine = peaks.direction @ (axis / np.linalg.norm(axis)) if len(peaks.direction) else np.zeros(0)
    texture = (ratio ** 2 * cosine ** 2 + (1 - cosine ** 2) / ratio) ** -1.5
    profile = peaks.to_profile(fwhm, zero_shift, peaks.intensity * texture)
    background = strength * rng.uniform(0.0, 0.1) * np.exp(-(GRID - GRID[0]) / rng.uniform(10.0, 40.0))
    noise = strength * rng.uniform(0.0, 0.02) * rng.normal(size=GRID.size)
    return _unit_maximum(np.clip(profile + background + noise, 0.0, None))


def agreement(observed: np.ndarray, computed: np.ndarray, smoothing: float = AGREEMENT_SMOOTHING) -> float:
    """An Rwp-like disagreement of two profiles on the grid, unit weights: sqrt(sum (y - c·ŷ)² / sum y²), with
    the scale c fitted by least squares, after both are smoothed by a Gaussian of FWHM `smoothing` degrees (so a
    lattice a little off scores between a match and a miss). 0 is identical up to scale; 1 is no overlap.

    >>> profile = np.exp(-0.5 * ((GRID - 30) / 0.1) ** 2)
    >>> near, far = agreement(profile, np.roll(profile, 2)), agreement(profile, np.roll(profile, 100))
    >>> agreement(profile, 2 * profile), 0 < near < 0.5, round(far, 3)
    (0.0, True, 1.0)
    """
    if smoothing > 0:
        sigma = smoothing / (2 * np.sqrt(2 * np.log(2))) / STEP
        offsets = np.arange(-int(4 * sigma) - 1, int(4 * sigma) + 2)
        kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
        observed, computed = (np.convolve(profile, kernel, mode="same") for profile in (observed, computed))
    denominator = float(computed @ computed)
    scale = float(observed @ computed) / denominator if denominator > 0 else 0.0
    residual = observed - scale * computed
    return float(np.sqrt((residual @ residual) / max(float(observed @ observed), 1e-12)))


@dataclass(frozen=True)
class PowderPattern:
    """A given powder pattern (Cu Kα): 2θ in degrees, increasing, with intensities, and where it came from."""

    two_theta: np.ndarray
    intensity: np.ndarray
    source: str

    @classmethod
    def from_file(cls, path: str | Path) -> PowderPattern:
        """Read a pattern export: two columns 2θ / intensity (`.xy`, `.txt`, `.dat`, `.csv` with or without a
        header; `.xye` has a third column of errors, ignored), or a CIF, whose pattern is computed. Bad patterns
        raise CrystaLLMInputError naming the file and the problem: empty, not numbers, NaN, 2θ not increasing,
        or a 2θ range that is not Cu Kα's 5-90 degrees.
        """
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix != ".cif" and suffix not in PATTERN_SUFFIXES:
            raise CrystaLLMInputError(f"pattern {path}: unknown kind of file; give a two-column 2θ/intensity "
                                      f"export ({', '.join(PATTERN_SUFFIXES)}) or a CIF")
        try:
            text = path.read_text(errors="replace")
        except OSError as error:
            raise CrystaLLMInputError(f"pattern {path}: cannot read it ({error.strerror})") from None
        if suffix == ".cif":
            structure = cif.structure_from_cif(text, str(path))
            if structure.volume > MAX_VOLUME:  # its reflections would take minutes to list, and fit no cell here
                raise CrystaLLMInputError(f"pattern {path}: a cell of {structure.volume:.3g} Å³; patterns are "
                                          f"computed for cells up to {MAX_VOLUME:.0f} Å³")
            peaks = Peaks.from_structure(structure)
            return cls(GRID.copy(), peaks.to_profile().astype(float), str(path))
        return cls.from_columns(_numeric_rows(text.splitlines(), path), str(path))

    @classmethod
    def from_columns(cls, rows: np.ndarray, source: str) -> PowderPattern:
        """A pattern from rows of (2θ, intensity), checked as `from_file` says.

        >>> PowderPattern.from_columns(np.array([[10.0, 1.0], [9.0, 2.0]]), "p.xy")
        Traceback (most recent call last):
        ...
        crystallm.errors.CrystaLLMInputError: pattern p.xy: 2θ is not increasing (10 then 9 at rows 1-2)
        """
        two_theta, intensity = rows[:, 0], rows[:, 1]
        if not np.isfinite(rows[:, :2]).all():
            row = int(np.flatnonzero(~np.isfinite(rows[:, :2]).all(axis=1))[0]) + 1
            raise CrystaLLMInputError(f"pattern {source}: a value that is not a number (NaN or infinite) at data "
                                      f"row {row}")
        steps = np.diff(two_theta)
        if (steps <= 0).any():
            row = int(np.flatnonzero(steps <= 0)[0]) + 1
            raise CrystaLLMInputError(f"pattern {source}: 2θ is not increasing ({two_theta[row - 1]:g} then "
                                      f"{two_theta[row]:g} at rows {row}-{row + 1})")
        low, high = max(two_theta[0], TWO_THETA_RANGE[0]), min(two_theta[-1], TWO_THETA_RANGE[1])
        if two_theta[0] < 0 or two_theta[-1] > 180 or high - low < MIN_COVERAGE:
            raise CrystaLLMInputError(
                f"pattern {source}: 2θ runs from {two_theta[0]:g} to {two_theta[-1]:g} degrees, which covers "
                f"{max(high - low, 0):.0f} of the {TWO_THETA_RANGE[0]:g}-{TWO_THETA_RANGE[1]:g} degrees the model "
                f"reads (at least {MIN_COVERAGE:g} needed); the pattern must be 2θ in degrees for Cu Kα "
                f"(1.5418 Å): convert d-spacing, Q or another wavelength first")
        if not (intensity > 0).any():
            raise CrystaLLMInputError(f"pattern {source}: no positive intensity")
        return cls(two_theta, intensity, source)

    def to_profile(self) -> np.ndarray:
        """The intensities on the grid (linear interpolation, zero outside the pattern's range, negative values
        clipped), scaled to a maximum of 1."""
        profile = np.interp(GRID, self.two_theta, np.clip(self.intensity, 0, None), left=0.0, right=0.0)
        return _unit_maximum(profile)

    def to_file(self, path: str | Path) -> Path:
        """Write the pattern as a two-column `.xy` export (2θ, intensity; a comment line names the source), which
        `from_file` reads back.

        >>> import tempfile
        >>> from pymatgen.core import Lattice
        >>> nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [.5, .5, .5]])
        >>> pattern = PowderPattern(GRID, Peaks.from_structure(nacl).to_profile(), "NaCl, computed")
        >>> path = pattern.to_file(Path(tempfile.mkdtemp()) / "nacl.xy")
        >>> bool(np.allclose(PowderPattern.from_file(path).to_profile(), pattern.to_profile(), atol=1e-5))
        True
        """
        path = Path(path)
        rows = "\n".join(f"{t:.3f} {i:.6f}" for t, i in zip(self.two_theta, self.intensity))
        path.write_text(f"# {self.source}; 2theta (degrees, Cu Ka) and intensity\n{rows}\n")
        return path


_SEPARATOR = re.compile(r"[,;\s]+")


def _numeric_rows(lines: list[str], path: Path) -> np.ndarray:
    """The (2θ, intensity) rows of a text export: comments (#, !, ', ;) and one header line are skipped."""
    rows, header_seen = [], False
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if not stripped or stripped[0] in "#!';":
            continue
        fields = [field for field in _SEPARATOR.split(stripped) if field]
        try:
            values = [float(field) for field in fields[:2]]
        except ValueError:
            if rows or header_seen:
                raise CrystaLLMInputError(f"pattern {path}: line {number} is not two numbers: {stripped[:60]!r}")
            header_seen = True  # a column header such as "2theta,intensity"
            continue
        if len(values) < 2:
            raise CrystaLLMInputError(f"pattern {path}: line {number} has one column; expected 2θ and intensity")
        rows.append(values)
    if not rows:
        raise CrystaLLMInputError(f"pattern {path}: no data rows (an empty file or only comments)")
    return np.array(rows, dtype=float)


@dataclass(frozen=True)
class PatternMatch:
    """A structure's agreement with a given pattern (`agreement` of its computed profile; lower is better)."""

    name: str
    structure: Structure
    disagreement: float
    profile: np.ndarray


def rank_by_agreement(structures: list[tuple[str, Structure]], given: np.ndarray) -> list[PatternMatch]:
    """Structures ordered by how well their computed profile (`Peaks.to_profile`) matches the `given` profile,
    best first; a cell over MAX_VOLUME is not computed and comes last (disagreement inf, a zero profile).

    >>> from pymatgen.core import Lattice
    >>> cell = lambda a: Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), ["Na", "Cl"], [[0, 0, 0], [.5, .5, .5]])
    >>> given = Peaks.from_structure(cell(5.64)).to_profile()
    >>> [m.name for m in rank_by_agreement([("a=6.0", cell(6.0)), ("a=5.65", cell(5.65))], given)]
    ['a=5.65', 'a=6.0']
    """
    matches = []
    for name, structure in structures:
        if structure.volume > MAX_VOLUME:  # not computed: ranked last
            matches.append(PatternMatch(name, structure, math.inf, np.zeros_like(given)))
            continue
        profile = Peaks.from_structure(structure).to_profile()
        matches.append(PatternMatch(name, structure, agreement(given, profile), profile))
    return sorted(matches, key=lambda match: match.disagreement)


def plot_overlay(given: np.ndarray, match: PatternMatch, path: str | Path, source: str = "given") -> None:
    """Save a PNG of the given profile (up) and a structure's computed one (mirrored down), each scaled to a
    maximum of 1, on the grid."""
    import matplotlib

    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 4))
    axes.plot(GRID, given, color="black", linewidth=1.0, label=f"given ({Path(source).name})")
    axes.plot(GRID, -match.profile, color="tab:red", linewidth=1.0,
              label=f"{match.name}: {match.structure.composition.reduced_formula}, computed "
                    f"(disagreement {match.disagreement:.3f})")
    axes.axhline(0, color="grey", linewidth=0.5)
    axes.set_xlabel("2θ (degrees, Cu Kα)")
    axes.set_ylabel("intensity (each scaled to 1)")
    axes.set_xlim(*TWO_THETA_RANGE)
    axes.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
