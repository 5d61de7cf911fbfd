"""Stability (docs/architecture.md): CHGNet relaxation, MP2020-corrected energies, energy above an approximate
convex hull, RMSD between generated and relaxed structure, and the S.U.N. rate.

Every approximation is written into each summary (`approximations`):
- Energies come from CHGNet (its weights ship inside the chgnet wheel), trained on the Materials Project's
  relaxation trajectories. Its energies already sit on MP's corrected (MP2020-compatible) scale: applying
  pymatgen's MaterialsProject2020Compatibility on top counts the corrections twice (measured, see
  `place_on_hull`), so they are used as they are; `RelaxationSettings(mp2020=True)` applies the scheme, with the
  Hubbard U values MP's input set gives the composition (taken from the scheme itself), POTCARs unchecked.
- The hull is not MP's: pymatgen's PhaseDiagram per chemical system, built from the formation energies in
  ../shared/data (MP-20 biternary val+test, the MP-20 slices, MPTS-52 val+test, WBM) and MP's elemental
  reference entries (formation energy 0). A phase missing from these sets is missing from the hull, so E_hull
  is measured against a hull that is at best as deep as MP's: it tends to be lower than MP's own value.
- Relaxation: FIRE on positions and cell (ASE's FrechetCellFilter) until the largest force is under `fmax`, at
  most `steps` steps and `max_seconds` per structure; an unconverged relaxation is kept and flagged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import numpy as np
from pymatgen.core import Element, Structure
from tqdm import tqdm

from crystallm.errors import CrystaLLMInputError
from crystallm.evaluation import reports
from crystallm.evaluation.hull import HULL_SOURCES, STABLE_E_HULL, ReferenceHull, place_on_hull
from crystallm.evaluation.pools import worker_pool

SHIPPED_HULL = (f"the approximate hull the package ships: pymatgen PhaseDiagram per chemical system from the "
                f"formation_energy_per_atom of {', '.join(HULL_SOURCES)} (../shared/data) and MP elemental "
                f"references; not MP's full hull")


CHGNET_LAST_ELEMENT = Element("Pu")  # its atom embedding covers Z 1-94
# The potentials whose weights ship inside their wheels (nothing is downloaded): name -> SevenNet model name, or
# None for CHGNet. SevenNet is an optional extra (`pip install crystallm[sevennet]`).
POTENTIALS = {"chgnet": None, "sevennet": "7net-l3i5", "sevennet-0": "7net-0"}
# Whether a potential's energies need MP2020's corrections to sit on MP's scale, measured (docs/stability.md):
# CHGNet learnt corrected energies (E_hull MAE against MP 0.028 as is, 0.199 corrected again); SevenNet learnt
# MPtrj's uncorrected ones (E_hull MAE against DFT on 200 WBM materials 0.120 as is, 0.074 corrected).
MP2020_BY_DEFAULT = {"chgnet": False, "sevennet": True, "sevennet-0": True}


@dataclass(frozen=True)
class RelaxationSettings:
    """How far a relaxation may go, by which `potential` (a key of `POTENTIALS`), and on which `hull` the result
    is placed (a hull file, see `hull.ReferenceHull.to_file`; None: the approximate hull the package ships; not a
    setting of the relaxation itself, so a cached relaxation serves every hull). A structure whose volume changes
    by more than `max_volume_ratio` (either way) or whose energy stops being finite has exploded and is recorded
    as failed. `steps=0` takes the energy of the structure as it is (a single call: what ranks CSP attempts at
    scale, see eval/csp.py).

    >>> RelaxationSettings(potential="mace")
    Traceback (most recent call last):
    ...
    crystallm.errors.CrystaLLMInputError: potential 'mace': choose one of chgnet, sevennet, sevennet-0
    """

    steps: int = 100
    fmax: float = 0.1  # eV/Å
    max_seconds: float = 60.0
    max_volume_ratio: float = 3.0
    mp2020: bool | None = None  # MP2020 corrections on the potential's energy; None: MP2020_BY_DEFAULT's choice
    potential: str = "chgnet"
    hull: str | None = None

    def __post_init__(self):
        if self.potential not in POTENTIALS:
            raise CrystaLLMInputError(f"potential {self.potential!r}: choose one of {', '.join(POTENTIALS)}")
        if self.mp2020 is None:
            object.__setattr__(self, "mp2020", MP2020_BY_DEFAULT[self.potential])
        if self.hull:
            ReferenceHull.from_file(self.hull)  # a bad hull file fails here, before any work (read once, cached)


@dataclass(frozen=True)
class StabilityTask:
    """Relax every structurally valid structure under `settings` and place it on the settings' hull; results go to
    the JSON-lines `cache` as they come (`evaluate`'s default: `default_stability_cache`), and a run resumes from
    it."""

    settings: RelaxationSettings = RelaxationSettings()
    cache: str | Path | None = None


def displacements(initial: Structure, final: Structure) -> np.ndarray:
    """Distance (Å) each atom moved, fractional differences taken the short way and measured in the final
    lattice.

    >>> from pymatgen.core import Lattice
    >>> a = Structure(Lattice.cubic(4.0), ["Cs", "Cl"], [[0, 0, 0], [.5, .5, .5]])
    >>> b = Structure(Lattice.cubic(4.0), ["Cs", "Cl"], [[0.99, 0, 0], [.5, .5, .5]])
    >>> displacements(a, b).round(3).tolist()
    [0.04, 0.0]
    """
    delta = final.frac_coords - initial.frac_coords
    delta -= np.rint(delta)
    return np.linalg.norm(final.lattice.get_cartesian_coords(delta), axis=1)


@lru_cache(maxsize=2)
def _calculator(potential: str):
    """One ASE calculator of each potential per process (loading a model takes seconds)."""
    if POTENTIALS[potential] is None:
        from chgnet.model.dynamics import CHGNetCalculator

        with contextlib.redirect_stdout(io.StringIO()):  # it prints the device it runs on
            return CHGNetCalculator(use_device="cpu", on_isolated_atoms="ignore")
    try:
        from sevenn.calculator import SevenNetCalculator
    except ImportError:
        raise CrystaLLMInputError(f"potential {potential!r} needs SevenNet: pip install crystallm[sevennet]") from None
    with warnings.catch_warnings():  # no accelerated tensor-product kernel on CPU: a note, not a problem
        warnings.simplefilter("ignore")
        return SevenNetCalculator(POTENTIALS[potential], device="cpu")


def relax_structure(structure: Structure, settings: RelaxationSettings = RelaxationSettings()) -> dict:
    """Relax one structure with the settings' potential. Returns its energies per atom before and after (eV/atom), the
    relaxed structure (as a dict), the RMSD and mean displacement (Å), steps, whether it converged, seconds and
    `error` ('' or why it failed: CHGNet raised, the energy is not finite, the cell exploded). Never raises.
    """
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE
    from pymatgen.io.ase import AseAtomsAdaptor

    started = time.perf_counter()
    result = {"error": "", "seconds": 0.0}
    try:
        beyond = sorted({e.symbol for e in structure.composition if e.Z > CHGNET_LAST_ELEMENT.Z})
        if beyond and settings.potential == "chgnet":
            raise ValueError(f"CHGNet knows the elements up to {CHGNET_LAST_ELEMENT} (Z {CHGNET_LAST_ELEMENT.Z}), "
                             f"not {', '.join(beyond)}")
        atoms = AseAtomsAdaptor.get_atoms(structure)
        atoms.calc = _calculator(settings.potential)
        initial_energy = atoms.get_potential_energy() / len(atoms)
        cell_filter = FrechetCellFilter(atoms)
        steps, converged = 0, False
        with contextlib.redirect_stdout(io.StringIO()):
            optimizer = FIRE(cell_filter, logfile=None)
            for converged in optimizer.irun(fmax=settings.fmax, steps=settings.steps):
                steps = optimizer.nsteps
                if converged or time.perf_counter() - started > settings.max_seconds:
                    break
        energy = atoms.get_potential_energy() / len(atoms)
        relaxed = AseAtomsAdaptor.get_structure(atoms)
        for key in list(relaxed.site_properties):
            relaxed.remove_site_property(key)
        ratio = relaxed.volume / structure.volume
        if not (math.isfinite(energy) and math.isfinite(initial_energy)):
            raise FloatingPointError(f"the {settings.potential} energy is not finite")
        if not 1 / settings.max_volume_ratio <= ratio <= settings.max_volume_ratio:
            raise FloatingPointError(f"the cell exploded: its volume changed {ratio:.2f} times")
        moved = displacements(structure, relaxed)
        result.update(initial_energy_per_atom=float(initial_energy), energy_per_atom=float(energy),
                      rmsd=float(np.sqrt(np.mean(moved ** 2))), mean_displacement=float(moved.mean()),
                      steps=int(steps), converged=bool(converged), relaxed=relaxed.as_dict())
    except Exception as error:  # a pathological cell must not stop the batch: recorded with its reason
        result["error"] = f"{type(error).__name__}: {error}"
    result["seconds"] = time.perf_counter() - started
    return result


def relax_structures(structures: list[Structure], steps: int = 50, fmax: float = 0.1,
                     max_seconds: float = 60.0) -> list[dict]:
    """`relax_structure` for each structure, in order (see it for the fields).

    >>> from pymatgen.core import Lattice
    >>> cscl = Structure(Lattice.cubic(4.2), ["Cs", "Cl"], [[0, 0, 0], [.5, .5, .5]])
    >>> [result] = relax_structures([cscl], steps=5)
    >>> result["error"], result["energy_per_atom"] < 0
    ('', True)
    """
    settings = RelaxationSettings(steps=steps, fmax=fmax, max_seconds=max_seconds)
    return [relax_structure(structure, settings) for structure in structures]


def _worker_start() -> None:
    import torch

    torch.set_num_threads(1)  # one process per core beats two threads on these small graphs


def _relax_star(args) -> dict:
    name, structure_dict, settings = args
    return {"name": name, **relax_structure(Structure.from_dict(structure_dict), settings)}


def stability_records(structures: Iterable[tuple[str, Structure]], cache: str | Path,
                      settings: RelaxationSettings = RelaxationSettings(), num_proc: int | None = None,
                      progress: bool = True, ray: str | None = None) -> list[dict]:
    """Relax each (name, structure) and place it on the settings' hull (`place_on_hull`), in order, with a
    progress bar. Each relaxation is appended to the JSON-lines `cache`
    as soon as it is known with its `settings` (the potential included), and names already there under the same
    settings are not relaxed again (a killed run resumes; records from before settings or the potential were
    recorded count as CHGNet's under the same settings); the hull placement and MP2020 are applied afresh to the
    cached relaxation every time. Worker processes (default: one per core; with `ray`, workers of a Ray cluster,
    see `pools.worker_pool`) each hold a potential.
    """
    structures = list(structures)
    cache = Path(cache)
    wanted = _relaxation_key(dataclasses.asdict(settings))
    reference = ReferenceHull.from_file(settings.hull) if settings.hull else ReferenceHull.from_file()
    done = {record["name"]: record for record in reports.read_json_lines(cache)
            if _relaxation_key(record.get("settings", wanted)) == wanted}
    todo = [(name, structure.as_dict(), settings) for name, structure in structures if name not in done]
    num_proc = num_proc or (None if ray else os.cpu_count() or 1)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache, "a") as handle, tqdm(total=len(structures), initial=len(structures) - len(todo),
                                          desc="relaxing", unit=" structures", disable=not progress) as bar:
        pooled = todo and (ray or num_proc > 1)
        with worker_pool(num_proc, ray, "spawn", _worker_start) if pooled else contextlib.nullcontext() as pool:
            results = pool.imap(_relax_star, todo) if pool else map(_relax_star, todo)
            for record in results:
                line = json.dumps({**record, "settings": wanted})
                handle.write(line + "\n")
                handle.flush()
                done[record["name"]] = json.loads(line)  # as a resumed run will read it
                bar.update(1)
    return [place_on_hull(done[name], reference, settings.mp2020) for name, _ in structures]


def _relaxation_key(settings: dict) -> dict:
    """The settings a cached relaxation must share to be reused: not where it is placed (the hull, MP2020's
    corrections: both applied afresh to the cached energy); a record from before the potential was recorded is
    CHGNet's."""
    return {"potential": "chgnet"} | {key: value for key, value in settings.items() if key not in ("hull", "mp2020")}


def rank_by_energy(structures: list[tuple[str, Structure]], cache: str | Path,
                   settings: RelaxationSettings = RelaxationSettings(), progress: bool = True) -> list[dict]:
    """Relax each (name, structure) (`stability_records`, resumable through `cache`) and return their results
    ordered by the potential's energy per atom after the relaxation (`settings.steps=0`: as given), lowest first,
    each with its `rank` (1 = best guess); structures whose relaxation failed come last, in input order.
    """
    results = stability_records(structures, cache, settings, progress=progress)
    ordered = sorted(results, key=lambda r: (bool(r["error"]), r.get("energy_per_atom", math.inf)))
    return [{"rank": rank, **record} for rank, record in enumerate(ordered, 1)]


def _statistic(function, records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if key in r]
    return float(function(values)) if values else None


def approximations(settings: RelaxationSettings) -> dict[str, str]:
    """What a stability figure under `settings` rests on, in words: the energy, the hull, the relaxation, the cut.

    >>> approximations(RelaxationSettings(potential="sevennet"))["energy"]
    'sevennet (7net-l3i5, its wheel) energies with MP2020 corrections applied'
    """
    if settings.potential == "chgnet" and not settings.mp2020:
        energy = ("chgnet (its wheel) energies as they are: already on MP's MP2020-corrected scale (applying the "
                  "scheme again worsens E_hull vs MP's own column from 0.028 to 0.199 eV/atom MAE)")
    else:
        model = f"{POTENTIALS[settings.potential]}, its wheel" if POTENTIALS[settings.potential] else "its wheel"
        energy = f"{settings.potential} ({model}) energies " + ("with MP2020 corrections applied" if settings.mp2020
                                                                 else "as they are")
    return {"energy": energy, "hull": f"the hull file {settings.hull}" if settings.hull else SHIPPED_HULL,
            "relaxation": "ASE FIRE + FrechetCellFilter (positions and cell), bounded steps and seconds per structure",
            "stable": f"E_hull < {STABLE_E_HULL} eV/atom",
            "rmsd": "root mean square of the atoms' displacements (Å) between generated and relaxed structure, "
                    "fractional differences taken the short way, in the relaxed lattice"}


def stopped_by_time(record: dict, steps: int) -> bool:
    """Whether a relaxation ended at its `max_seconds`, neither converged nor at its `steps`: its energy, RMSD and
    steps then depend on the machine's load as well as on the structure, so paired comparisons leave it out
    (docs/stability.md).

    >>> stopped_by_time({"error": "", "converged": False, "steps": 12}, steps=50)
    True
    >>> stopped_by_time({"error": "", "converged": False, "steps": 50}, steps=50)
    False
    """
    return not record["error"] and not record["converged"] and record["steps"] < steps


def summarize_stability(records: list[dict], entries: int, unique: dict[str, bool] | None = None,
                        novel: dict[str, bool] | None = None,
                        settings: RelaxationSettings = RelaxationSettings()) -> dict:
    """Rates over all `entries` evaluated (unreadable and invalid ones count as not stable): stable share,
    S.U.N. rate (stable, unique among the samples, novel against the training set: `unique` and `novel` map
    names to flags), medians of E_hull, RMSD and relaxation steps and mean CHGNet energies before and after over
    the relaxed ones, seconds per structure, failures by reason, and how many relaxations the time cap ended.

    >>> records = [{"name": "a", "error": "", "e_above_hull": 0.02, "stable": True, "rmsd": 0.1, "seconds": 2.0,
    ...             "converged": True, "steps": 9},
    ...            {"name": "b", "error": "FloatingPointError: the cell exploded", "seconds": 1.0}]
    >>> summary = summarize_stability(records, entries=4, unique={"a": True}, novel={"a": True})
    >>> summary["stable_rate"], summary["sun_rate"], summary["failed"], summary["median_rmsd"]
    (0.25, 0.25, 1, 0.1)
    """
    relaxed = [r for r in records if not r["error"]]
    stable = [r for r in relaxed if r["stable"]]
    reasons: dict[str, int] = {}
    for r in records:
        if r["error"]:
            reason = r["error"].split(":")[0]
            reasons[reason] = reasons.get(reason, 0) + 1
    summary = {
        "entries": entries, "relaxed": len(relaxed), "failed": len(records) - len(relaxed),
        "failure_reasons": reasons, "stable": len(stable), "stable_rate": len(stable) / entries if entries else None,
        "median_e_above_hull": float(np.median([r["e_above_hull"] for r in relaxed])) if relaxed else None,
        "median_rmsd": float(np.median([r["rmsd"] for r in relaxed])) if relaxed else None,
        "converged": sum(bool(r.get("converged")) for r in relaxed),
        "stopped_by_time": sum(stopped_by_time(r, settings.steps) for r in relaxed),
        "median_steps": _statistic(np.median, relaxed, "steps"),
        "mean_initial_energy_per_atom": _statistic(np.mean, relaxed, "initial_energy_per_atom"),
        "mean_energy_per_atom": _statistic(np.mean, relaxed, "energy_per_atom"),
        "core_seconds_per_structure": float(np.mean([r["seconds"] for r in records])) if records else None,
        "approximations": approximations(settings), "sun": None, "sun_rate": None,
    }
    if unique is not None and novel is not None:
        sun = [r for r in stable if unique.get(r["name"]) and novel.get(r["name"])]
        summary.update(sun=len(sun), sun_rate=len(sun) / entries if entries else None)
    return summary


def stability_classification(predicted: list[float], known: list[float], cut: float = STABLE_E_HULL) -> dict:
    """How well predicted E_hull values call stability against known (DFT) ones, both read as stable at or below
    `cut` (eV/atom; Matbench Discovery's cut is 0): precision, recall, F1, the false-positive rate (unstable
    materials called stable, over the unstable ones), the counts, and the E_hull MAE.

    >>> result = stability_classification([-0.1, 0.05, 0.3, -0.02], [-0.05, 0.2, 0.4, 0.01], cut=0.0)
    >>> result["precision"], result["recall"], result["false_positive_rate"], round(result["mae"], 3)
    (0.5, 1.0, 0.333, 0.083)
    """
    predicted, known = np.asarray(predicted, float), np.asarray(known, float)
    called, stable = predicted <= cut, known <= cut
    true_positive = int((called & stable).sum())
    precision = true_positive / int(called.sum()) if called.any() else None
    recall = true_positive / int(stable.sum()) if stable.any() else None
    f1 = 2 * precision * recall / (precision + recall) if precision and recall else 0.0
    false_positive_rate = round(int((called & ~stable).sum()) / int((~stable).sum()), 3) if (~stable).any() else None
    return {"cut": cut, "n": len(known), "stable_known": int(stable.sum()), "called_stable": int(called.sum()),
            "precision": precision, "recall": recall, "f1": f1, "false_positive_rate": false_positive_rate,
            "mae": float(np.mean(np.abs(predicted - known))) if len(known) else None}


def e_hull_agreement(records: list[dict], known: dict[str, float], threshold: float = STABLE_E_HULL) -> dict:
    """How E_hull by this method compares with known values (e.g. MP's e_above_hull column) for the relaxed
    records whose name has one: mean absolute error, median of each, and the share under `threshold` by each.

    >>> agreement = e_hull_agreement([{"name": "a", "error": "", "e_above_hull": 0.05}], {"a": 0.0})
    >>> agreement["rows"], round(agreement["mae"], 3), agreement["stable_share_known"]
    (1, 0.05, 1.0)
    """
    pairs = [(r["e_above_hull"], known[r["name"]]) for r in records if not r["error"] and r["name"] in known]
    ours, theirs = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    if not pairs:
        return {"rows": 0}
    return {"rows": len(pairs), "mae": float(np.mean(np.abs(ours - theirs))),
            "median": float(np.median(ours)), "median_known": float(np.median(theirs)),
            "stable_share": float(np.mean(ours < threshold)), "stable_share_known": float(np.mean(theirs < threshold))}
