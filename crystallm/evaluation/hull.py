"""The approximate convex hull of `crystallm.evaluation.relaxation`'s stability protocol: pymatgen's PhaseDiagram
per chemical system from the formation energies in ../shared/data and MP's elemental references; a relaxation
result placed on it gets its E_hull.

The package ships the hull (`HULL_FILE`: the lowest formation energy of each reduced formula, which gives the
same hull as every entry), so stability and design work from any folder; `eval/reference_hull.py` writes it."""

from __future__ import annotations

import csv
import gzip
import itertools
import json
import math
import re
import warnings
from functools import lru_cache
from pathlib import Path

from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
from pymatgen.core import Composition, Structure
from pymatgen.entries.computed_entries import ComputedEntry, ComputedStructureEntry

from crystallm import data
from crystallm.errors import CrystaLLMInputError

STABLE_E_HULL = 0.1  # eV/atom: the S.U.N. threshold (docs/architecture.md)


HULL_SOURCES = ("mp_20_biternary/val", "mp_20_biternary/test", "mp_20_subset_slices/all", "mpts_52/val",
                "mpts_52/test", "wbm/val")


ELEMENTAL_REFERENCES = "matbench_discovery/2023-02-07-mp-elemental-reference-entries.json.gz"
HULL_FILE = Path(__file__).parents[1] / "resources" / "reference-hull.json.gz"
# The Materials Project's own hull (CC BY-NC: read to measure, never shipped; see its README).
MP_HULL_SUMMARY = "mp_hull/mp_materials_summary.csv.gz"


@lru_cache(maxsize=1)
def _compatibility():
    from pymatgen.entries.compatibility import MaterialsProject2020Compatibility

    return MaterialsProject2020Compatibility(check_potcar=False)


def mp2020_corrected_energy(structure: Structure | Composition, energy: float) -> float:
    """A structure's (or a composition's) total energy (eV) with the MP2020 corrections (anion, GGA/GGA+U
    mixing) applied, the Hubbard U values being those MP's input set gives this composition (a structure also
    tells oxides from peroxides). Raises ValueError if the scheme refuses the composition.

    >>> from pymatgen.core import Lattice
    >>> feo = Structure(Lattice.cubic(4.3), ["Fe", "O"], [[0, 0, 0], [.5, .5, .5]])
    >>> round(mp2020_corrected_energy(feo, -10.0) + 10.0, 3)  # Fe's U correction and the oxide correction
    -2.943
    """
    compatibility = _compatibility()
    composition = structure if isinstance(structure, Composition) else structure.composition
    elements = sorted(composition.elements, key=lambda e: e.X if math.isfinite(e.X) else math.inf)
    u_values = compatibility.u_settings.get(elements[-1].symbol, {})
    hubbards = {e.symbol: float(u_values[e.symbol]) for e in elements if u_values.get(e.symbol)}
    parameters = {"run_type": "GGA+U" if hubbards else "GGA", "hubbards": hubbards}
    entry = ComputedEntry(structure, energy, parameters=parameters) if isinstance(structure, Composition) \
        else ComputedStructureEntry(structure, energy, parameters=parameters)
    with warnings.catch_warnings():  # oxidation-state guessing notes
        warnings.simplefilter("ignore")
        processed = compatibility.process_entry(entry)
    if processed is None:
        raise ValueError(f"MP2020 compatibility refuses {structure.composition.reduced_formula}")
    return float(processed.energy)


class ReferenceHull:
    """The approximate convex hull of formation energies (see the module's notes), one pymatgen PhaseDiagram
    per chemical system, built when first asked for.

    >>> hull = ReferenceHull.from_shared_data()
    >>> e_hull, formation = hull.e_above_hull(Composition("NaCl"), -2.0)
    >>> round(formation - e_hull, 2)  # NaCl's hull energy: MP's formation energy of rock salt NaCl
    -2.11
    """

    def __init__(self, formation_energies: list[tuple[Composition, float]], elemental_energies: dict[str, float]):
        self.formation_energies = formation_energies
        self.elemental_energies = elemental_energies
        self._by_system: dict[frozenset, list] = {}
        for composition, energy in formation_energies:
            key = frozenset(e.symbol for e in composition.elements)
            self._by_system.setdefault(key, []).append(PDEntry(composition, energy * composition.num_atoms))
        self._diagrams: dict[frozenset, object] = {}

    @classmethod
    def from_shared_data(cls, sources: tuple[str, ...] = HULL_SOURCES) -> "ReferenceHull":
        """The hull from ../shared/data: the formation energies of `sources` and MP's elemental references."""
        return _shared_hull(sources)

    @classmethod
    def from_mp_summary(cls, path: str | Path | None = None) -> "ReferenceHull":
        """MP's own hull from its materials summary (`MP_HULL_SUMMARY` in ../shared/data: each hull material's
        composition and total energy), as formation energies against the same elemental references as the shipped
        hull. The file's "Corrected Energy" is the raw DFT energy (NaCl -1.803, TiO2 -3.044, NiO +0.395 eV/atom
        as formation energies, where MP lists -2.110, -3.502, -1.219), so the MP2020 corrections are applied here,
        which gives MP's values. CC BY-NC: for measurement; write it (`to_file`) outside the package only.

        Building it takes about two minutes (31,840 entries corrected); eval/mp_hull.py writes it once:

        >>> ReferenceHull.from_mp_summary().to_file("mp-hull.json.gz")  # doctest: +SKIP
        """
        path = Path(path) if path else data.data_dir() / MP_HULL_SUMMARY
        elemental = _elemental_references()
        references, formation_energies = cls([], elemental), []  # the first for its `formation_energy` alone
        with gzip.open(path, "rt") as handle:
            for row in csv.DictReader(handle):
                composition = Composition(row["Composition"])
                if not all(e.symbol in elemental for e in composition.elements):
                    continue
                try:
                    energy = mp2020_corrected_energy(composition, float(row["Corrected Energy"]))
                except ValueError:  # the scheme refuses the composition: MP leaves such entries out too
                    continue
                energy /= composition.num_atoms
                formation_energies.append((composition, references.formation_energy(composition, energy)))
        return cls(formation_energies, elemental)

    @classmethod
    def from_file(cls, path: str | Path = HULL_FILE) -> "ReferenceHull":
        """The hull `to_file` wrote (by default the one shipped with the package, built from ../shared/data)."""
        return _hull_from_file(str(path))

    def to_file(self, path: str | Path) -> None:
        """Write the hull as gzipped JSON: the lowest formation energy (eV/atom) of each reduced formula, which
        spans the same hull as all of them, and the elemental references."""
        lowest: dict[str, float] = {}
        for composition, energy in self.formation_energies:
            formula = composition.reduced_formula
            lowest[formula] = min(energy, lowest.get(formula, math.inf))
        with gzip.open(path, "wt") as handle:
            json.dump({"elemental_energies": self.elemental_energies,
                       "formation_energies": sorted(lowest.items())}, handle)

    def formation_energy(self, composition: Composition, energy_per_atom: float) -> float:
        """Formation energy per atom (eV/atom) of a corrected total energy per atom, from MP's elemental
        references. Raises ValueError for an element without one."""
        missing = [e.symbol for e in composition.elements if e.symbol not in self.elemental_energies]
        if missing:
            raise ValueError(f"no elemental reference energy for {', '.join(missing)}")
        fractions = composition.fractional_composition
        return energy_per_atom - sum(fractions[e] * self.elemental_energies[e.symbol] for e in composition.elements)

    def e_above_hull(self, composition: Composition, energy_per_atom: float) -> tuple[float, float]:
        """(E_hull, formation energy), both eV/atom, of a composition at a corrected energy per atom. E_hull is
        negative for a structure below the hull of the known phases."""
        formation = self.formation_energy(composition, energy_per_atom)
        return self.e_above_hull_of_formation(composition, formation), float(formation)

    def e_above_hull_of_formation(self, composition: Composition, formation: float) -> float:
        """E_hull (eV/atom) of a composition at a formation energy per atom (eV/atom), e.g. a DFT one."""
        diagram = self._diagram(frozenset(e.symbol for e in composition.elements))
        _, e_hull = diagram.get_decomp_and_e_above_hull(PDEntry(composition, formation * composition.num_atoms),
                                                        allow_negative=True)
        return float(e_hull)

    def _diagram(self, system: frozenset):
        if system not in self._diagrams:
            entries = [PDEntry(Composition(symbol), 0.0) for symbol in system]  # the elements: formation energy 0
            for size in range(1, len(system) + 1):
                for subsystem in itertools.combinations(sorted(system), size):
                    entries += self._by_system.get(frozenset(subsystem), [])
            self._diagrams[system] = PhaseDiagram(entries)
        return self._diagrams[system]


@lru_cache(maxsize=2)
def _hull_from_file(path: str) -> ReferenceHull:
    try:
        with gzip.open(path, "rt") as handle:
            stored = json.load(handle)
        return ReferenceHull([(Composition(formula), float(energy))
                              for formula, energy in stored["formation_energies"]],
                             {symbol: float(energy) for symbol, energy in stored["elemental_energies"].items()})
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CrystaLLMInputError(f"{path}: not a hull file (gzipped JSON of `ReferenceHull.to_file`: "
                                  f"{type(error).__name__}: {error})") from None


@lru_cache(maxsize=4)
def _shared_hull(sources: tuple[str, ...]) -> ReferenceHull:
    formation_energies = []
    for name in sources:
        dataset = data.load_source(name)
        for cif, energy in zip(dataset["cif"], dataset["formation_energy_per_atom"]):
            composition = composition_of_cif(cif)
            if composition and energy is not None and math.isfinite(energy):
                formation_energies.append((composition, float(energy)))
    return ReferenceHull(formation_energies, _elemental_references())


def composition_of_cif(cif: str) -> Composition | None:
    """The composition a CIF states (`_chemical_formula_sum`), read without parsing the structure; None without one.

    >>> composition_of_cif("data_x\\n_chemical_formula_sum   'Na4 Cl4'\\n").reduced_formula
    'NaCl'
    """
    formula = re.search(r"_chemical_formula_sum\s+'?([^'\n]+)", cif)
    return Composition(formula.group(1)) if formula else None


def _elemental_references() -> dict[str, float]:
    """MP's elemental reference energies (eV/atom), as Matbench Discovery lists them."""
    with gzip.open(data.data_dir() / ELEMENTAL_REFERENCES, "rt") as handle:
        references = json.load(handle)
    return {symbol: entry["energy"] / sum(entry["composition"].values()) for symbol, entry in references.items()}


def place_on_hull(result: dict, hull: ReferenceHull, mp2020: bool = False) -> dict:
    """A relaxation result (`relax_structure`'s fields) placed against the hull: plus `formation_energy_per_atom`,
    `e_above_hull` (eV/atom) and `stable`; `error` set if it cannot be placed. CHGNet's energy is used as it is:
    it already sits on MP's corrected scale (measured on 500 mp20-bt test structures: E_hull MAE against MP's
    own column 0.028 eV/atom as is, 0.199 with MP2020 applied on top, which counts the corrections twice);
    `mp2020=True` applies them anyway, for energies that lack them."""
    if result["error"]:
        return result
    relaxed = Structure.from_dict(result["relaxed"])
    energy = result["energy_per_atom"]
    try:
        if mp2020:
            energy = mp2020_corrected_energy(relaxed, energy * len(relaxed)) / len(relaxed)
        e_hull, formation = hull.e_above_hull(relaxed.composition, energy)
    except ValueError as error:
        return result | {"error": f"ValueError: {error}"}
    return result | {"formation_energy_per_atom": formation, "e_above_hull": e_hull, "stable": e_hull < STABLE_E_HULL}


