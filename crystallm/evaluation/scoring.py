"""Scoring structures (docs/architecture.md): each entry of a collection becomes one `ScoredStructure` (its
structure, validity, symmetry and self-consistency, or the reason it could not be scored), in worker processes;
`metrics.summarize` turns the records into the set-level metrics. Used by `crystallm evaluate`, the generate folder and
the eval/ stages.

Every entry that cannot be read or scored is kept as a record with its reason; nothing stops the batch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Iterator

import numpy as np
from pymatgen.core import Structure

from crystallm import symmetry, validity
from crystallm.errors import CrystaLLMInputError
from crystallm.evaluation import distribution
from crystallm.evaluation.pools import ordered_map
from crystallm.evaluation.readers import Entry
from crystallm.io import cif, text_format

MAX_ATOMS = 1000  # larger cells are reported, not scored: pair distances grow as n^2


@dataclasses.dataclass
class ScoredStructure:
    """One scored entry: the structure and its per-structure metrics, or `error` (the reason it could not be
    scored, all metrics left at their defaults); fingerprints only where coverage was asked for.

    >>> from pymatgen.core import Lattice
    >>> record = score_structure("CsCl", Structure(Lattice.cubic(4.2), ["Cs", "Cl"], [[0, 0, 0], [.5, .5, .5]]))
    >>> record.formula, record.valid, record.space_group_0_1
    ('CsCl', True, 221)
    """

    name: str
    error: str = ""
    structure: Structure | None = None
    formula: str = ""
    n_atoms: int = 0
    n_elements: int = 0
    volume: float = math.nan
    density: float = math.nan
    structural_valid: bool = False
    compositional_valid: bool = False
    space_group_0_1: int | None = None
    space_group_0_01: int | None = None
    stated_space_group: int | None = None
    formula_consistent: bool | None = None
    bond_length_score: float | None = None
    structure_fp: list[float] | None = None
    composition_fp: list[float] | None = None

    @property
    def valid(self) -> bool:
        """Structurally and compositionally valid (CDVAE's overall validity)."""
        return self.structural_valid and self.compositional_valid

    def space_group(self, symprec: str) -> int | None:
        """The space group spglib detected at symprec "0.1" or "0.01"."""
        return getattr(self, f"space_group_{symprec.replace('.', '_')}")

    def to_dict(self) -> dict:
        """The record as a flat JSON-able dict, without the structure and fingerprints (records files)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("structure", "structure_fp", "composition_fp")}
        return fields | {"valid": self.valid}


def structure_of_entry(entry: Entry) -> tuple[Structure, str | None, int | None]:
    """The structure of an entry, with its stated formula and space group where the entry states them."""
    if entry.kind == "structure":
        return entry.payload, None, None
    content = entry.payload.decode("utf-8", errors="replace") if isinstance(entry.payload, bytes) else entry.payload
    if not content.strip():
        raise CrystaLLMInputError("empty entry")
    if entry.kind == "text" or text_format.is_crystal_text(content):
        crystal = text_format.read_crystal_text(content)
        return (text_format.crystal_text_to_structure(crystal), text_format.format_formula(crystal.formula),
                crystal.space_group)
    return cif.structure_from_cif(content, entry.name), None, None


def score_entry(entry: Entry, fingerprints: bool = False, bond_lengths: bool = False) -> ScoredStructure:
    """The record of one entry; `error` holds the reason where it could not be read or scored."""
    try:
        structure, stated_formula, stated_group = structure_of_entry(entry)
    except (CrystaLLMInputError, ValueError, KeyError, IndexError, TypeError) as error:
        return ScoredStructure(entry.name, error=f"{type(error).__name__}: {error}")
    return score_structure(entry.name, structure, stated_formula, stated_group, fingerprints, bond_lengths)


def score_structure(name: str, structure: Structure, stated_formula: str | None = None,
                    stated_group: int | None = None, fingerprints: bool = False,
                    bond_lengths: bool = False) -> ScoredStructure:
    """The record of one structure (see `ScoredStructure` for an example); `stated_formula` and `stated_group`
    are what a text claimed, checked against the structure."""
    try:
        if len(structure) == 0:
            raise CrystaLLMInputError("no atoms")
        if len(structure) > MAX_ATOMS:
            raise CrystaLLMInputError(f"{len(structure)} atoms (more than {MAX_ATOMS})")
        if not np.isfinite(structure.frac_coords).all() or not np.isfinite(structure.lattice.matrix).all():
            raise CrystaLLMInputError("non-finite coordinates or lattice")
        if not structure.is_ordered:
            raise CrystaLLMInputError("disordered (partial occupancy)")
    except (CrystaLLMInputError, ValueError, KeyError, IndexError, TypeError) as error:
        return ScoredStructure(name, error=f"{type(error).__name__}: {error}")
    composition = structure.composition
    record = ScoredStructure(
        name, structure=structure,
        formula=composition.reduced_formula,
        n_atoms=len(structure),
        n_elements=len(composition.elements),
        volume=float(structure.volume),
        density=float(structure.density) if structure.volume > 0 else math.nan,
        structural_valid=validity.structural_validity(structure),
        compositional_valid=validity.compositional_validity(composition),
        space_group_0_1=_space_group(structure, 0.1),
        space_group_0_01=_space_group(structure, 0.01),
        stated_space_group=stated_group,
        formula_consistent=validity.formula_consistent(structure, stated_formula) if stated_formula else None,
    )
    if bond_lengths:
        record.bond_length_score = validity.bond_length_reasonableness(structure)
    if fingerprints and record.valid:
        found = distribution.fingerprints(structure)
        if found is not None:
            record.structure_fp, record.composition_fp = found[0].tolist(), found[1].tolist()
    return record


def _space_group(structure: Structure, symprec: float) -> int | None:
    try:
        return symmetry.detect_space_group(structure, symprec)
    except Exception:  # spglib raises on pathological cells; the record says "none found"
        return None


def _score_star(args) -> ScoredStructure:
    return score_entry(*args)


def score_entries(entries: Iterable[Entry], fingerprints: bool = False, bond_lengths: bool = False,
                  num_proc: int | None = None, ray: str | None = None) -> Iterator[ScoredStructure]:
    """Score entries in worker processes (on a Ray cluster with `ray`, see `pools.worker_pool`), yielding records
    in input order as they finish."""
    work = ((entry, fingerprints, bond_lengths) for entry in entries)
    yield from ordered_map(_score_star, work, num_proc, ray, chunksize=16)
