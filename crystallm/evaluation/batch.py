"""Batch evaluation (docs/architecture.md): read any collection, score each structure in worker processes,
then the set-level metrics, with novelty against a reference, distribution distances and coverage against a test
set, CSP match rates and CHGNet stability where asked. `crystallm evaluate` and the eval/ stages call `evaluate`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import time
from pathlib import Path

from tqdm import tqdm

from crystallm.data import read_ids
from crystallm.errors import CrystaLLMInputError
from crystallm.evaluation import distribution, plots
from crystallm.evaluation.csp import CSPTask
from crystallm.evaluation.metrics import MetricInputs, summarize
from crystallm.evaluation.readers import iter_entries
from crystallm.evaluation.reference import ReferenceSet
from crystallm.evaluation.relaxation import StabilityTask
from crystallm.evaluation.scoring import ScoredStructure, score_entries, structure_of_entry
from crystallm.io.files import InputPolicy

# CDVAE's coverage cutoffs per dataset; MPTS-52 has none of its own, so it uses MP-20's.
COVERAGE_CUTOFFS = {"perov-5": {"structure": 0.2, "composition": 4.0},
                    "carbon-24": {"structure": 0.2, "composition": 4.0}}


@dataclasses.dataclass(frozen=True)
class EvaluationOptions:
    """How `evaluate` runs: `coverage` (COV-R/COV-P: CrystalNN fingerprints, slower), `bond_lengths`
    (CrystaLLM's bond-length reasonableness), `ids` (only the entries of these names, e.g. a fixed subset of a
    split), `limit` (only the first entries), `num_proc` (worker processes; default all cores), `ray` (run the
    scoring and relaxation workers on a Ray cluster: "local", "auto" or an address; see `pools.worker_pool`),
    `progress`, `records_path` (each structure's record as a JSON line, written as it is scored), `plots` (a
    folder for PNG plots), and `neighbours` for novelty against a reference with embeddings
    (`properties.embedding.knn_reference`): each structure is matched against that many nearest same-formula
    entries only."""

    coverage: bool = False
    bond_lengths: bool = False
    ids: tuple[str, ...] | None = None
    limit: int | None = None
    num_proc: int | None = None
    ray: str | None = None
    progress: bool = True
    records_path: str | Path | None = None
    plots: str | Path | None = None
    neighbours: int = 10
    inputs: InputPolicy = InputPolicy()  # what an input walk may read: links out of a folder, file sizes


def _no_structures(source: str | Path, skipped: list[str]) -> CrystaLLMInputError:
    found = f"; skipped {len(skipped)} files that are not structure files ({', '.join(skipped[:3])})" if skipped else ""
    return CrystaLLMInputError(f"{source}: no structures found (expected CIFs, crystallm texts, extxyz frames or CSV "
                               f"rows){found}")


def _check_readable(collections: dict[str, str | Path | None]) -> None:
    """CrystaLLMInputError unless each named collection (role: name) holds a structure that can be read: a
    comparison with nothing would report a number all the same. Stops at each one's first readable entry; checked
    before the input is scored."""
    for role, name in collections.items():
        if name and not any(_readable(entry) for entry in iter_entries(name)):
            raise _unusable(name, role)


def _unusable(name: str | Path, role: str) -> CrystaLLMInputError:
    return CrystaLLMInputError(f"{name}: no readable structure to use as the {role}")


def _readable(entry) -> bool:
    try:
        structure_of_entry(entry)
        return True
    except Exception:  # noqa: BLE001  (any entry that cannot be read: the next one may be)
        return False


def evaluate(source: str | Path, reference: str | ReferenceSet | None = None, test: str | None = None,
             csp: CSPTask | None = None, stability: StabilityTask | None = None,
             options: EvaluationOptions = EvaluationOptions()) -> dict:
    """Evaluate a collection (see `readers.iter_entries`) and return the summary: validity, symmetry,
    uniqueness; novelty against `reference` (the training set: a collection, or a `ReferenceSet`); Wasserstein
    distances and coverage against `test`; CSP match rates (`csp`); stability, and S.U.N. with a `reference`
    (`stability`). Files in a zip or folder that are not structure files are listed under `skipped`; a
    collection with no structure at all raises CrystaLLMInputError.

    >>> summary = evaluate("mp20-bt/test", options=EvaluationOptions(limit=5, num_proc=1, progress=False))
    >>> summary["entries"], summary["validity"]["structural"]
    (5, 1.0)
    """
    start = time.perf_counter()
    _check_readable({"test set": test, "CSP targets": csp.targets if csp else None,
                     "novelty reference": reference if isinstance(reference, (str, Path)) else None})
    skipped: list[str] = []
    entries = iter_entries(source, skipped, options.inputs)
    first = next(entries, None)  # opens the source: a missing or unreadable one fails here, before any progress
    if first is None:
        raise _no_structures(source, skipped)
    entries = itertools.chain([first], entries)
    if options.ids is not None:
        wanted = set(options.ids)
        entries = (entry for entry in entries if entry.name in wanted)
    if options.limit:
        entries = itertools.islice(entries, options.limit)
    records = []
    with open(options.records_path, "w") if options.records_path else contextlib.nullcontext() as handle:
        for record in tqdm(score_entries(entries, fingerprints=options.coverage, bond_lengths=options.bond_lengths,
                                         num_proc=options.num_proc, ray=options.ray), desc="scoring",
                           unit=" structures",
                           disable=not options.progress):
            records.append(record)
            if handle:
                handle.write(json.dumps(record.to_dict()) + "\n")
    if not records:
        raise _no_structures(source, skipped)
    # A collection named twice (the test split as input, --test and --csp) is scored once.
    scored = {str(source): [r for r in records if not r.error]} if not options.limit and options.ids is None else {}

    def collection(name: str, role: str, fingerprints: bool = False) -> list[ScoredStructure]:
        if str(name) not in scored:
            scored[str(name)] = [r for r in score_entries(iter_entries(name), fingerprints=fingerprints,
                                                          num_proc=options.num_proc, ray=options.ray) if not r.error]
        if not scored[str(name)]:  # every entry readable but none scorable (e.g. all disordered)
            raise _unusable(name, role)
        return scored[str(name)]

    test_records = collection(test, "test set", options.coverage) if test else None
    benchmark = str(test or "").partition("/")[0]
    reference_set = reference if isinstance(reference, ReferenceSet) or not reference \
        else ReferenceSet.from_collection(reference)
    targets = _csp_targets(csp, collection(csp.targets, "CSP targets")) if csp else None
    if stability:
        stability = dataclasses.replace(stability, cache=stability.cache or default_stability_cache(source))
    summary = summarize(MetricInputs(
        records, test_records, COVERAGE_CUTOFFS.get(benchmark, distribution.MP20_COVERAGE_CUTOFFS), reference_set,
        options.neighbours, csp, targets, stability, skipped or None, num_proc=options.num_proc, ray=options.ray,
        progress=options.progress))
    reference = reference_set.source if reference_set else None
    summary.update(input=str(source), reference=reference, test=test)
    summary["seconds"] = time.perf_counter() - start
    summary["structures_per_second"] = len(records) / summary["seconds"]
    if options.plots:
        compared = test_records or (collection(reference, "reference") if reference else None)
        plots.write_plots(records, compared, options.plots)
    return summary


def _csp_targets(task: CSPTask, targets: list[ScoredStructure]) -> list[ScoredStructure]:
    """The targets the task's ids file lists, in its order (all of them without one)."""
    if not task.ids_file:
        return targets
    wanted = read_ids(task.ids_file)
    by_name = {t.name: t for t in targets}
    missing = [name for name in wanted if name not in by_name]
    if missing:
        raise CrystaLLMInputError(f"{task.ids_file}: {len(missing)} ids are not in {task.targets}, e.g. {missing[:3]}")
    return [by_name[name] for name in wanted]


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
