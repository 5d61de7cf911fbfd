"""How close two atoms may come while the grammar decodes: the floor, and periodic distances of whole orbits.

The grammar knows the lattice before any site is written and every orbit placed so far, so it can measure, for
all candidate tokens at once, how close the atoms a token would place come to the others and to each other
(their periodic images included), and refuse those under the floor (`CrystalGrammarLogitsProcessor`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from crystallm import validity

# The 27 neighbouring cells: with fractional differences wrapped into [-0.5, 0.5), the nearest image of a pair
# lies among them for any cell the format writes (angles in [59, 121) degrees).
_IMAGES = np.array(list(itertools.product((-1.0, 0.0, 1.0), repeat=3)))
# Elements of work per chunk of candidates (candidates x orbit x (orbit + placed) x images): bounds memory.
_CHUNK_ELEMENTS = 2_000_000


@lru_cache(maxsize=None)
def _covalent_radius(element: str) -> float:
    from pymatgen.analysis.molecule_structure_comparator import CovalentRadius

    return CovalentRadius.radius.get(element, 1.5)  # 1.5 Å: the heavy elements pymatgen's table leaves out


@dataclass(frozen=True)
class DistanceFloor:
    """The shortest distance decoding lets two atoms have: `min_distance` (Å; the validity definition's 0.5 by
    default), or, with `covalent_fraction`, that fraction of the sum of the two elements' covalent radii where it
    is larger (element-pair aware, stricter).

    >>> DistanceFloor().between("Na", "Cl"), round(DistanceFloor(covalent_fraction=0.5).between("Na", "Cl"), 2)
    (0.5, 1.34)
    """

    min_distance: float = validity.MIN_DISTANCE
    covalent_fraction: float | None = None

    def between(self, element: str, other: str) -> float:
        """The floor for a pair of elements, in Å."""
        if self.covalent_fraction is None:
            return self.min_distance
        return max(self.min_distance,
                   self.covalent_fraction * (_covalent_radius(element) + _covalent_radius(other)))

    def to_others(self, element: str, others: list[str]) -> np.ndarray:
        """The floors between `element` and each of `others`, as an array."""
        if self.covalent_fraction is None:
            return np.full(len(others), self.min_distance)
        return np.array([self.between(element, other) for other in others])


@lru_cache(maxsize=None)
def _images(reach: tuple[int, ...]) -> np.ndarray:
    """Lattice translations within `reach` cells along each axis."""
    return np.array(list(itertools.product(*[range(-r, r + 1) for r in reach])), dtype=float)


def too_close_for_each(lattice: np.ndarray, orbits: list[tuple[np.ndarray, np.ndarray]], values: np.ndarray,
                       placed: np.ndarray, floors: np.ndarray, self_floor: float) -> np.ndarray:
    """For orbits whose atoms move along lines as one free coordinate t varies (atom i of an orbit at
    `start[i] + t * step[i]`, fractional), which of `values` of t put two atoms under their floor: an atom of the
    orbit and one `placed` (floors: one per placed atom), or two atoms of the orbit (`self_floor`), periodic
    images included. One row per orbit; a fixed orbit is `step` = 0.

    Every pair's squared distance is a quadratic in t, so the values it forbids form one interval: the pairs of
    all orbits are solved at once and their intervals marked on the sorted `values`, at a cost that does not
    grow with the number of values (a grammar step weighs every token it could offer in one pass).

    >>> lattice = np.eye(3) * 4.0  # Cl on (t, 0, 0) and (-t, 0, 0) of a 4 Å cube with Na at the corner
    >>> line = (np.zeros((2, 3)), np.array([[1.0, 0, 0], [-1.0, 0, 0]]))
    >>> values = np.array([0.05, 0.2, 0.3, 0.45])
    >>> too_close_for_each(lattice, [line], values, np.zeros((1, 3)), np.array([0.5]), 0.5).tolist()
    [[True, False, False, True]]
    """
    parts = [_pairs(start, step, placed, floors, self_floor) for start, step in orbits]
    owner = np.concatenate([np.full(len(part[0]), index) for index, part in enumerate(parts)])
    offsets, slopes, pair_floors, own = (np.concatenate(column) for column in zip(*parts))
    offsets -= np.round(offsets)
    # Images far enough that a pair moving by up to |slope| per unit of t can meet any of them.
    images = _images(tuple(np.ceil(np.abs(slopes).max(axis=0)).astype(int) + 1))
    u = (offsets @ lattice)[:, None, :] + (images @ lattice)[None]  # (pairs, images, 3): the distance at t = 0
    v = slopes @ lattice  # (pairs, 3): its change per unit of t
    real = ~(own[:, None] & (np.abs(images).sum(1) == 0)[None])  # an atom and itself in the same cell: not a pair
    a = np.broadcast_to((v * v).sum(-1)[:, None], u.shape[:2])
    b = 2 * np.einsum("pik,pk->pi", u, v)
    c = (u * u).sum(-1) - pair_floors[:, None] ** 2
    moving = a > 1e-12
    root = np.sqrt(np.maximum(b * b - 4 * a * c, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        low = np.where(moving, (-b - root) / (2 * a), np.where(c < 0, -np.inf, np.inf))
        high = np.where(moving, (-b + root) / (2 * a), np.where(c < 0, np.inf, -np.inf))
    hits = real & (low < high)
    order = np.argsort(values)
    sorted_values = values[order]
    width = len(values) + 1  # each orbit's marks in its own stretch of one array
    row = np.broadcast_to(owner[:, None], hits.shape)[hits] * width
    begin = row + np.searchsorted(sorted_values, low[hits], side="right")  # low < value < high: under the floor
    end = row + np.searchsorted(sorted_values, high[hits], side="left")
    size = len(orbits) * width
    marks = (np.bincount(begin, minlength=size) - np.bincount(end, minlength=size)).reshape(len(orbits), width)
    forbidden = np.empty((len(orbits), len(values)), dtype=bool)
    forbidden[:, order] = np.cumsum(marks[:, :-1], axis=1) > 0
    return forbidden


def _pairs(start, step, placed, floors, self_floor):
    """Offsets, slopes, floors of the pairs an orbit makes with the placed atoms and within itself, and which
    pairs are an atom with itself (its periodic images only)."""
    size = len(start)
    first, second = np.triu_indices(size, k=0)
    return (np.concatenate([(start[:, None, :] - placed[None]).reshape(-1, 3), start[first] - start[second]]),
            np.concatenate([np.repeat(step, len(placed), axis=0), step[first] - step[second]]),
            np.concatenate([np.tile(floors, size), np.full(len(first), self_floor)]),
            np.concatenate([np.zeros(size * len(placed), dtype=bool), first == second]))


def orbit_clearance(lattice: np.ndarray, orbits: np.ndarray, placed: np.ndarray, floors: np.ndarray,
                    self_floor: float) -> np.ndarray:
    """For each candidate orbit, the smallest ratio distance / floor between its atoms and the atoms `placed`
    (floors: one per placed atom) and among its own atoms (`self_floor`), periodic images included; >= 1 means
    the candidate keeps every pair at or above its floor.

    lattice: (3, 3) rows a, b, c in Å; orbits: (candidates, m, 3) fractional; placed: (n, 3) fractional.

    >>> lattice = np.eye(3) * 4.0
    >>> orbits = np.array([[[0.5, 0.5, 0.5]], [[0.05, 0.0, 0.0]]])  # the cube's centre, or next to the corner
    >>> orbit_clearance(lattice, orbits, np.zeros((1, 3)), np.array([0.5]), 0.5).round(2).tolist()
    [6.93, 0.4]
    """
    candidates, size = orbits.shape[:2]
    per_candidate = size * (size + len(placed)) * len(_IMAGES)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, per_candidate))
    return np.concatenate([_clearance(lattice, orbits[start:start + chunk], placed, floors, self_floor)
                           for start in range(0, candidates, chunk)]) if candidates else np.zeros(0)


def _clearance(lattice, orbits, placed, floors, self_floor) -> np.ndarray:
    size = orbits.shape[1]
    others = np.concatenate([np.broadcast_to(placed, (len(orbits), *placed.shape)), orbits], axis=1)
    difference = orbits[:, :, None, :] - others[:, None, :, :]  # (c, m, n + m, 3)
    difference -= np.round(difference)
    cartesian = (difference[..., None, :] + _IMAGES) @ lattice  # (c, m, n + m, 27, 3)
    distances = np.sqrt((cartesian ** 2).sum(-1))
    # An atom's own position (itself, in the same cell) is not a pair; its images in other cells are.
    own = np.zeros(distances.shape[1:], dtype=bool)
    own[np.arange(size), len(placed) + np.arange(size), 13] = True  # image 13 is (0, 0, 0)
    distances[:, own] = np.inf
    pair_floors = np.concatenate([floors, np.full(size, self_floor)])
    return (distances.min(-1) / pair_floors).min(axis=(1, 2))
