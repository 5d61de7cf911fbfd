"""Batch evaluation of structures (DESIGN.md section 5): read any collection, score each structure in worker
processes, then the set-level metrics. Used by `crystallm evaluate` and the eval/ stages.

Every entry that cannot be read or scored is kept as a record with its reason; nothing stops the batch.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import gzip
import json
import math
import multiprocessing
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
from pymatgen.core import Structure

from crystallm import data, reports, serialization, symmetry
from crystallm.errors import CrystaLLMInputError
from crystallm.metrics import distribution, matching, symmetry_stats, validity

if TYPE_CHECKING:
    from crystallm.metrics.stability import RelaxationSettings

MAX_ATOMS = 1000  # larger cells are reported, not scored: pair distances grow as n^2
CIF_SUFFIXES = (".cif", ".mcif")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One item of an input collection: its name and a payload to turn into a structure."""

    name: str
    kind: str  # "cif", "text" (crystallm text) or "structure" (a pymatgen dict)
    payload: object


def iter_entries(source: str | Path) -> Iterator[Entry]:
    """Entries of a zip of CIFs, a folder of CIFs, an extxyz file, a CSV with a `cif` or `text` column, the
    output folder of `crystallm generate` (the texts of its journal), or a benchmark split such as `mp20-bt/test`.

    >>> next(iter_entries("mp20-bt/test")).name
    'mp-10009'
    """
    path = Path(source)
    if not path.exists():
        benchmark, _, split = str(source).partition("/")
        if benchmark in data.BENCHMARKS and split in ("train", "test"):
            dataset = data.load_split(benchmark, split)
            for row_id, cif in zip(dataset["id"], dataset["cif"]):
                yield Entry(row_id, "cif", cif)
            return
        raise FileNotFoundError(f"{source}: no such file or folder, and not a benchmark split "
                                f"({', '.join(f'{b}/test' for b in data.BENCHMARKS)})")
    if path.is_dir():
        if (path / "samples.jsonl").exists():  # a generate folder: its journal holds every sample's text
            for sample in reports.read_json_lines(path / "samples.jsonl"):
                yield Entry(sample["name"], "text", sample["text"])
            return
        for file in sorted(path.iterdir()):
            if file.suffix.lower() in CIF_SUFFIXES:
                yield Entry(file.name, "cif", file.read_bytes())
        return
    suffixes = "".join(path.suffixes).lower()
    if suffixes.endswith(".zip"):
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.is_dir():
                    yield Entry(info.filename, "cif", archive.read(info))
    elif suffixes.endswith((".extxyz", ".xyz")):
        yield from _extxyz_entries(path)
    elif suffixes.endswith((".csv", ".csv.gz")):
        yield from _csv_entries(path)
    else:
        yield Entry(path.name, "cif", path.read_bytes())


def _extxyz_entries(path: Path) -> Iterator[Entry]:
    from ase.io import iread
    from pymatgen.io.ase import AseAtomsAdaptor

    for index, atoms in enumerate(iread(str(path), index=":", format="extxyz")):
        yield Entry(atoms.info.get("name", f"{path.name}#{index}"), "structure",
                    AseAtomsAdaptor.get_structure(atoms).as_dict())


def _csv_entries(path: Path) -> Iterator[Entry]:
    csv.field_size_limit(1 << 30)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        kind = "text" if "text" in columns else "cif" if "cif" in columns else None
        if kind is None:
            raise CrystaLLMInputError(f"{path}: a CSV needs a 'cif' or 'text' column, found {columns}")
        key = next((c for c in ("id", "material_id", "name") if c in columns), None)
        for index, row in enumerate(reader):
            yield Entry(row[key] if key else f"{path.name}#{index}", kind, row[kind])


def _structure_of(entry: Entry) -> tuple[Structure, str | None, int | None]:
    """The structure of an entry, with its stated formula and space group where the entry states them."""
    if entry.kind == "structure":
        return Structure.from_dict(entry.payload), None, None
    content = entry.payload.decode("utf-8", errors="replace") if isinstance(entry.payload, bytes) else entry.payload
    if not content.strip():
        raise CrystaLLMInputError("empty entry")
    if entry.kind == "text" or serialization.is_crystal_text(content):
        crystal = serialization.read_crystal_text(content)
        return (serialization.crystal_text_to_structure(crystal), serialization.format_formula(crystal.formula),
                crystal.space_group)
    return serialization.structure_from_cif(content, entry.name), None, None


def score_entry(entry: Entry, fingerprints: bool = False, bond_lengths: bool = False) -> dict:
    """Per-structure metrics of one entry; `error` holds the reason where it could not be scored."""
    record: dict = {"name": entry.name, "error": ""}
    try:
        structure, stated_formula, stated_group = _structure_of(entry)
        if len(structure) == 0:
            raise CrystaLLMInputError("no atoms")
        if len(structure) > MAX_ATOMS:
            raise CrystaLLMInputError(f"{len(structure)} atoms (more than {MAX_ATOMS})")
        if not np.isfinite(structure.frac_coords).all() or not np.isfinite(structure.lattice.matrix).all():
            raise CrystaLLMInputError("non-finite coordinates or lattice")
        if not structure.is_ordered:
            raise CrystaLLMInputError("disordered (partial occupancy)")
    except (CrystaLLMInputError, ValueError, KeyError, IndexError, TypeError) as error:
        record["error"] = f"{type(error).__name__}: {error}"
        return record
    composition = structure.composition
    record.update(
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
        structure=structure.as_dict(),
    )
    record["valid"] = record["structural_valid"] and record["compositional_valid"]
    if bond_lengths:
        record["bond_length_score"] = validity.bond_length_reasonableness(structure)
    if fingerprints and record["valid"]:
        found = distribution.fingerprints(structure)
        if found is not None:
            record["structure_fp"], record["composition_fp"] = (found[0].tolist(), found[1].tolist())
    return record


def _space_group(structure: Structure, symprec: float) -> int | None:
    try:
        return symmetry.detect_space_group(structure, symprec)
    except Exception:  # spglib raises on pathological cells; the record says "none found"
        return None


def _score_star(args) -> dict:
    return score_entry(*args)


def score_entries(entries, fingerprints: bool = False, bond_lengths: bool = False,
                  num_proc: int | None = None) -> Iterator[dict]:
    """Score entries in worker processes, yielding records in input order as they finish."""
    work = ((entry, fingerprints, bond_lengths) for entry in entries)
    if num_proc == 1:
        yield from map(_score_star, work)
        return
    with multiprocessing.get_context("fork").Pool(num_proc) as pool:
        yield from pool.imap(_score_star, work, chunksize=16)


def _rate(values) -> float | None:
    values = [bool(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _reason(record: dict) -> str:
    """The kind of an error, for counting: its exception name and first words, the entry's name left out.

    >>> _reason({"name": "a.cif", "error": "MalformedCIFError: a.cif: not a readable CIF (Invalid CIF file)"})
    'MalformedCIFError: not a readable CIF'
    """
    words = record["error"].replace(f"{record['name']}: ", "").split()
    return " ".join(words[:5]).rstrip(":")


def summarize(records: list[dict], reference: list[dict] | None = None, test: list[dict] | None = None,
              coverage_cutoffs: dict[str, float] | None = None, uniqueness: bool = True) -> dict:
    """Set-level metrics of scored records (see README for every key).

    Rates under `validity` count unreadable entries as invalid (CDVAE's convention); uniqueness is over
    valid structures; novelty is over unique valid structures against `reference` (the training set).
    `uniqueness=False` leaves out the pairwise matching (for summaries rewritten while a run goes on).
    Each valid record gets its flags `unique` (and `novel`, with a reference) for per-structure use (S.U.N.).
    """
    scored = [r for r in records if not r["error"]]
    valid = [r for r in scored if r["valid"]]
    reasons: dict[str, int] = {}
    for r in records:
        if r["error"]:
            reasons[_reason(r)] = reasons.get(_reason(r), 0) + 1
    n = len(records)
    summary = {
        "entries": n,
        "scored": len(scored),
        "unreadable": n - len(scored),
        "unreadable_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        "validity": {
            "structural": sum(r["structural_valid"] for r in scored) / n if n else None,
            "compositional": sum(r["compositional_valid"] for r in scored) / n if n else None,
            "overall": len(valid) / n if n else None,
        },
        "symmetry": {
            f"symprec_{p}": symmetry_stats.space_group_statistics(
                [r[f"space_group_{p.replace('.', '_')}"] for r in scored],
                [r["stated_space_group"] for r in scored] if any(r["stated_space_group"] for r in scored) else None)
            for p in ("0.1", "0.01")
        },
        "self_consistency": {
            "formula": _rate(r["formula_consistent"] for r in scored),
            "bond_length_score_mean": float(np.mean([r["bond_length_score"] for r in scored]))
            if scored and "bond_length_score" in scored[0] else None,
        },
    }
    if uniqueness or reference is not None:
        structures = [Structure.from_dict(r["structure"]) for r in valid]
        unique = matching.unique_mask(structures)
        summary["uniqueness"] = sum(unique) / len(valid) if valid else None
        for record, flag in zip(valid, unique):
            record["unique"] = flag
    if reference is not None:
        reference_structures = [Structure.from_dict(r["structure"]) for r in reference]
        unique_structures = [s for s, u in zip(structures, unique) if u]
        novel = matching.novel_mask(unique_structures, reference_structures)
        for record, flag in zip([r for r, u in zip(valid, unique) if u], novel):
            record["novel"] = flag
        summary["novelty"] = sum(novel) / len(unique_structures) if unique_structures else None
        summary["reference_size"] = len(reference)
    if test is not None:
        summary["wasserstein"] = distribution.wasserstein_distances(
            [r["density"] for r in valid], [r["n_elements"] for r in valid],
            [r["density"] for r in test], [r["n_elements"] for r in test])
        summary["test_size"] = len(test)
        with_fp = [r for r in valid if "structure_fp" in r]
        test_fp = [r for r in test if "structure_fp" in r]
        if with_fp and test_fp:
            cutoffs = coverage_cutoffs or distribution.MP20_COVERAGE_CUTOFFS
            summary["coverage"] = distribution.coverage(
                np.array([r["structure_fp"] for r in with_fp]), np.array([r["composition_fp"] for r in with_fp]),
                np.array([r["structure_fp"] for r in test_fp]), np.array([r["composition_fp"] for r in test_fp]),
                cutoffs["structure"], cutoffs["composition"])
    return summary


def csp_targets(name: str) -> str:
    """The target id of a CSP prediction named '<id>' or '<id>__<attempt>' (e.g. 'mp-1234__3').

    >>> csp_targets("mp-1234__3"), csp_targets("mp-1234")
    ('mp-1234', 'mp-1234')
    """
    return name.split("__")[0]


def read_ids(path: str | Path) -> list[str]:
    """Ids of a fixed benchmark subset, one a line (`../shared/benchmarks/*.txt`)."""
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def csp_prompts(split: str, ids_file: str | Path, attempts: int) -> tuple[list, list[str]]:
    """CSP prompts (each target's reduced formula, `attempts` times) and their entry names '<id>__<k>'.

    >>> prompts, names = csp_prompts("mp20-bt/test", "../shared/benchmarks/mp20bt-test-csp200.txt", 2)
    >>> len(prompts), names[:2], prompts[0] == prompts[1]
    (400, ['mp-1095419__0', 'mp-1095419__1'], True)
    """
    from crystallm.generation import Prompt

    benchmark, _, part = split.partition("/")
    dataset = data.load_split(benchmark, part)
    cif_of = dict(zip(dataset["id"], dataset["cif"]))
    prompts, names = [], []
    for target in read_ids(ids_file):
        if target not in cif_of:
            raise CrystaLLMInputError(f"{ids_file}: id {target!r} is not in {split}")
        formula = serialization.structure_from_cif(cif_of[target], target).composition.reduced_formula
        prompts += [Prompt.of(formula=formula)] * attempts
        names += [f"{target}__{k}" for k in range(attempts)]
    return prompts, names


def evaluate_csp(records: list[dict], targets: list[dict], attempts: tuple[int, ...] = (1, 20),
                 energies: dict[str, float] | None = None) -> dict:
    """CSP match rate and mean RMS at each n in `attempts`. Predictions are grouped by target id (entry names
    '<id>' or '<id>__<k>', in input order); targets without predictions count as unmatched. With `energies`
    (entry name -> relaxed energy per atom), `ranked n=1` is the match rate of each target's lowest-energy
    prediction: what a user who takes the first of the ranked attempts gets (no energy: ranked last)."""
    predictions: dict[str, list[tuple[str, Structure | None]]] = {}
    for r in records:
        structure = None if r["error"] else Structure.from_dict(r["structure"])
        predictions.setdefault(csp_targets(r["name"]), []).append((r["name"], structure))
    target_structures = [Structure.from_dict(t["structure"]) for t in targets]
    groups = [predictions.get(t["name"], []) for t in targets]
    orders = {f"n={n}": ([[s for _, s in group] for group in groups], n) for n in attempts}
    if energies is not None:
        orders["ranked n=1"] = ([[s for _, s in sorted(group, key=lambda p: energies.get(p[0], math.inf))]
                                 for group in groups], 1)
    results = {}
    for key, (candidates, n) in orders.items():
        result, _ = matching.csp_match(target_structures, candidates, n)
        results[key] = {"match_rate": result.match_rate, "mean_rms": result.mean_rms,
                        "matched": result.matched, "targets": result.targets}
    return results


# CDVAE's coverage cutoffs per dataset; MPTS-52 has none of its own, so it uses MP-20's.
COVERAGE_CUTOFFS = {"perov-5": {"structure": 0.2, "composition": 4.0},
                    "carbon-24": {"structure": 0.2, "composition": 4.0}}


PER_STRUCTURE_OMITTED = ("structure", "structure_fp", "composition_fp")  # bulky fields left out of records files


def evaluate(source: str | Path, reference: str | None = None, test: str | None = None, csp: str | None = None,
             csp_ids: str | Path | None = None, attempts: tuple[int, ...] = (1, 20), coverage: bool = False,
             bond_lengths: bool = False, num_proc: int | None = None, limit: int | None = None,
             ids: list[str] | None = None, plots: str | Path | None = None,
             records_path: str | Path | None = None, progress: bool = True,
             stability: RelaxationSettings | None = None, stability_cache: str | Path | None = None,
             csp_energies: dict[str, float] | None = None) -> dict:
    """Evaluate a collection (see `iter_entries`) and return the summary; optionally write plots, and each
    structure's record as a JSON line to `records_path` as soon as it is scored. `ids`: only the entries of these
    names (e.g. a fixed subset of a split); `limit`: only the first entries.

    `stability` (relaxation settings) relaxes every structurally valid structure with CHGNet and places it
    against the approximate hull (`crystallm.metrics.stability`); each result goes to the JSON-lines
    `stability_cache` (default: `default_stability_cache(source)`) as it comes, and a run resumes from it.
    The S.U.N. rate needs `reference` (novelty). `csp_energies` adds CSP's `ranked n=1` (see `evaluate_csp`).

    >>> summary = evaluate("mp20-bt/test", limit=5, num_proc=1, progress=False)
    >>> summary["entries"], summary["validity"]["structural"]
    (5, 1.0)
    """
    import itertools
    import time

    from tqdm import tqdm


    start = time.perf_counter()
    entries = iter_entries(source)
    if ids is not None:
        wanted = set(ids)
        entries = (entry for entry in entries if entry.name in wanted)
    if limit:
        entries = itertools.islice(entries, limit)
    records = []
    with open(records_path, "w") if records_path else contextlib.nullcontext() as handle:
        for record in tqdm(score_entries(entries, fingerprints=coverage, bond_lengths=bond_lengths,
                                         num_proc=num_proc), desc="scoring", unit=" structures", disable=not progress):
            records.append(record)
            if handle:
                handle.write(json.dumps({k: v for k, v in record.items() if k not in PER_STRUCTURE_OMITTED}) + "\n")
    # A collection named twice (the test split as input, --test and --csp) is scored once.
    scored = {str(source): [r for r in records if not r["error"]]} if not limit and ids is None else {}

    def collection(name: str, fingerprints: bool = False) -> list[dict]:
        if str(name) not in scored:
            scored[str(name)] = [r for r in score_entries(iter_entries(name), fingerprints=fingerprints,
                                                          num_proc=num_proc) if not r["error"]]
        return scored[str(name)]

    reference_records = collection(reference) if reference else None
    test_records = collection(test, coverage) if test else None
    benchmark = str(test or "").partition("/")[0]
    summary = summarize(records, reference_records, test_records,
                        COVERAGE_CUTOFFS.get(benchmark, distribution.MP20_COVERAGE_CUTOFFS))
    if csp:
        targets = collection(csp)
        if csp_ids:
            wanted = read_ids(csp_ids)
            by_name = {t["name"]: t for t in targets}
            missing = [name for name in wanted if name not in by_name]
            if missing:
                raise CrystaLLMInputError(f"{csp_ids}: {len(missing)} ids are not in {csp}, e.g. {missing[:3]}")
            targets = [by_name[name] for name in wanted]
        summary["csp"] = evaluate_csp(records, targets, attempts, csp_energies)
        summary["csp_targets"] = f"{csp}" + (f" ({csp_ids}, {len(targets)} ids)" if csp_ids else "")
    if stability:
        summary["stability"] = _evaluate_stability(records, stability, stability_cache or default_stability_cache(
            source), num_proc, progress, with_novelty=reference is not None)
    summary.update(input=str(source), reference=reference, test=test)
    summary["seconds"] = time.perf_counter() - start
    summary["structures_per_second"] = len(records) / summary["seconds"]
    if plots:
        reports.write_plots(records, test_records or reference_records, plots)
    return summary


def default_stability_cache(source: str | Path) -> Path:
    """Where `evaluate` keeps relaxation results: `stability.jsonl` inside a folder, `<file>.stability.jsonl`
    beside a file, `stability-<split>.jsonl` here for a benchmark split.

    >>> str(default_stability_cache("mp20-bt/test")), str(default_stability_cache("examples"))
    ('stability-mp20-bt-test.jsonl', 'examples/stability.jsonl')
    """
    path = Path(source)
    if path.is_dir():
        return path / "stability.jsonl"
    if path.exists():
        return path.with_name(path.name + ".stability.jsonl")
    return Path(f"stability-{str(source).replace('/', '-')}.jsonl")


def _evaluate_stability(records: list[dict], settings, cache: str | Path, num_proc: int | None, progress: bool,
                        with_novelty: bool) -> dict:
    from crystallm.metrics.stability import stability_records, summarize_stability

    candidates = [(r["name"], Structure.from_dict(r["structure"])) for r in records
                  if not r["error"] and r["structural_valid"]]
    results = stability_records(candidates, cache, settings, num_proc=num_proc, progress=progress)
    flags = {key: {r["name"]: bool(r.get(key)) for r in records} for key in ("unique", "novel")}
    summary = summarize_stability(results, len(records), flags["unique"] if with_novelty else None,
                                  flags["novel"] if with_novelty else None)
    return summary | {"cache": str(cache), "settings": dataclasses.asdict(settings)}
