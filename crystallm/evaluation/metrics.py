"""Set-level metrics as units (docs/architecture.md, "Evaluation"): each `Metric` names what it needs of a
`MetricInputs`, computes its keys of the summary and says how they read in the report's table. `summarize` and
`markdown_table` iterate over `METRICS`, so a metric is added in one place: a class here and its entry in that
tuple. Records are read, never changed: the per-structure flags S.U.N. needs (unique, novel) are computed once on
the inputs.

>>> from itertools import islice
>>> from crystallm.evaluation.readers import iter_entries
>>> from crystallm.evaluation.scoring import score_entries
>>> records = list(score_entries(islice(iter_entries("mp20-bt/test"), 4), num_proc=1))
>>> summary = summarize(MetricInputs(records))
>>> summary["entries"], summary["validity"]["overall"], summary["uniqueness"]
(4, 1.0, 1.0)
>>> print(markdown_table(summary).splitlines()[2])
| entries | 4 |
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np

from crystallm.evaluation import distribution, matching, symmetry_stats
from crystallm.evaluation.csp import CSPTask, evaluate_csp
from crystallm.evaluation.reference import ReferenceSet
from crystallm.evaluation.relaxation import StabilityTask, stability_records, summarize_stability
from crystallm.evaluation.scoring import ScoredStructure


@dataclasses.dataclass
class MetricInputs:
    """What the metrics are computed from: the scored `records`, and where asked, the `test` set's records (with
    CDVAE's `coverage_cutoffs`), a novelty `reference` (`neighbours`: its k-NN pre-filter), resolved CSP targets
    (`csp`, `csp_targets`), a stability task with its cache, the names `skipped` as not structure files, and a
    generate run's `journal` rows (seconds, tokens, refine_seconds, resamples, fallbacks). `uniqueness=False`
    leaves out the pairwise matching (summaries rewritten while a run goes on)."""

    records: list[ScoredStructure]
    test: list[ScoredStructure] | None = None
    coverage_cutoffs: dict[str, float] | None = None
    reference: ReferenceSet | None = None
    neighbours: int | None = None
    csp: CSPTask | None = None
    csp_targets: list[ScoredStructure] | None = None
    stability: StabilityTask | None = None
    skipped: list[str] | None = None
    journal: list[dict] | None = None
    uniqueness: bool = True
    num_proc: int | None = 1
    ray: str | None = None
    progress: bool = False

    @functools.cached_property
    def scored(self) -> list[ScoredStructure]:
        return [r for r in self.records if not r.error]

    @functools.cached_property
    def valid(self) -> list[ScoredStructure]:
        return [r for r in self.scored if r.valid]

    @functools.cached_property
    def unique(self) -> dict[str, bool]:
        """Valid record name -> unique among the valid records (StructureMatcher, first of each kind kept)."""
        flags = matching.unique_mask([r.structure for r in self.valid], num_proc=self.num_proc, ray=self.ray)
        return {r.name: flag for r, flag in zip(self.valid, flags)}

    @functools.cached_property
    def novel(self) -> dict[str, bool]:
        """Unique valid record name -> matches nothing in `reference`."""
        unique = [r for r in self.valid if self.unique[r.name]]
        flags = self.reference.novel_mask([r.structure for r in unique], neighbours=self.neighbours)
        return {r.name: flag for r, flag in zip(unique, flags)}


Row = tuple[str, object]


class Metric:
    """One metric: `needs` names the `MetricInputs` fields it cannot do without (None or False there: the
    metric is left out), `compute` returns its summary keys, `rows` its lines of the table (from a summary,
    which may have been read back from JSON)."""

    needs: tuple[str, ...] = ()

    def applies(self, inputs: MetricInputs) -> bool:
        return all(getattr(inputs, need) not in (None, False) for need in self.needs)

    def compute(self, inputs: MetricInputs) -> dict:
        raise NotImplementedError

    def rows(self, summary: dict) -> list[Row]:
        raise NotImplementedError


def _rate(values) -> float | None:
    values = [bool(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _reason(record: ScoredStructure) -> str:
    """The kind of an error, for counting: its exception name and first words, the entry's name left out.

    >>> _reason(ScoredStructure("a.cif", error="MalformedCIFError: a.cif: not a readable CIF (Invalid CIF file)"))
    'MalformedCIFError: not a readable CIF'
    """
    words = record.error.replace(f"{record.name}: ", "").split()
    return " ".join(words[:5]).rstrip(":")


def _group_rows(group: str, values: dict | None) -> list[Row]:
    """`group key: value` rows, one level of nesting spelled `group key: inner`."""
    rows = []
    for key, value in (values or {}).items():
        if isinstance(value, dict):
            rows += [(f"{group} {key}: {inner}", number) for inner, number in value.items()]
        else:
            rows.append((f"{group}: {key}", value))
    return rows


class Counts(Metric):
    """Entries, the ones scored, and the unreadable ones by reason."""

    def compute(self, inputs):
        reasons: dict[str, int] = {}
        for record in inputs.records:
            if record.error:
                reasons[_reason(record)] = reasons.get(_reason(record), 0) + 1
        return {"entries": len(inputs.records), "scored": len(inputs.scored),
                "unreadable": len(inputs.records) - len(inputs.scored),
                "unreadable_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1]))}

    def rows(self, summary):
        return [("entries", summary["entries"]), ("unreadable", summary["unreadable"])]


class Skipped(Metric):
    """Files of a zip or folder that are not structure files."""

    needs = ("skipped",)

    def compute(self, inputs):
        return {"skipped": {"files": len(inputs.skipped), "names": inputs.skipped}}

    def rows(self, summary):
        return [("skipped (not structure files)", summary["skipped"]["files"])] if summary.get("skipped") else []


class ParseRate(Metric):
    """The share of a generate run's texts that parse into a structure."""

    needs = ("journal",)

    def compute(self, inputs):
        return {"parse_rate": len(inputs.scored) / len(inputs.records) if inputs.records else None}

    def rows(self, summary):
        return [("parse rate", summary["parse_rate"])] if summary.get("parse_rate") is not None else []


class Validity(Metric):
    """CDVAE's structural, compositional and overall validity; unreadable entries count as invalid."""

    def compute(self, inputs):
        n = len(inputs.records)
        return {"validity": {"structural": sum(r.structural_valid for r in inputs.scored) / n if n else None,
                             "compositional": sum(r.compositional_valid for r in inputs.scored) / n if n else None,
                             "overall": len(inputs.valid) / n if n else None}}

    def rows(self, summary):
        return [(f"validity: {key}", value) for key, value in summary["validity"].items()]


class Symmetry(Metric):
    """Space-group statistics at spglib's symprec 0.1 and 0.01, with the stated groups' agreement."""

    def compute(self, inputs):
        stated = [r.stated_space_group for r in inputs.scored]
        return {"symmetry": {f"symprec_{p}": symmetry_stats.space_group_statistics(
            [r.space_group(p) for r in inputs.scored], stated if any(stated) else None) for p in ("0.1", "0.01")}}

    def rows(self, summary):
        rows = []
        for precision, stats in summary["symmetry"].items():
            rows += [(f"P1 fraction ({precision})", stats["p1_fraction"]),
                     (f"distinct space groups ({precision})", stats["distinct"])]
            if stats.get("stated_agreement") is not None:
                rows.append((f"stated = detected ({precision})", stats["stated_agreement"]))
        return rows


class SelfConsistency(Metric):
    """Stated formula = structure's formula; CrystaLLM's bond-length reasonableness where scored."""

    def compute(self, inputs):
        scored = inputs.scored
        bonds = scored and scored[0].bond_length_score is not None
        return {"self_consistency": {
            "formula": _rate(r.formula_consistent for r in scored),
            "bond_length_score_mean": float(np.mean([r.bond_length_score for r in scored])) if bonds else None}}

    def rows(self, summary):
        return [(f"self-consistency: {key}", value) for key, value in summary["self_consistency"].items()
                if value is not None]


class Uniqueness(Metric):
    """The share of valid structures that match no earlier valid one."""

    needs = ("uniqueness",)

    def compute(self, inputs):
        return {"uniqueness": sum(inputs.unique.values()) / len(inputs.valid) if inputs.valid else None}

    def rows(self, summary):
        return [("uniqueness", summary["uniqueness"])] if summary.get("uniqueness") is not None else []


class Novelty(Metric):
    """The share of unique valid structures that match nothing in the reference (the training set)."""

    needs = ("reference",)

    def compute(self, inputs):
        novel = inputs.novel
        return {"novelty": sum(novel.values()) / len(novel) if novel else None,
                "reference_size": len(inputs.reference),
                "novelty_neighbours": inputs.neighbours if inputs.reference.embedder is not None else None}

    def rows(self, summary):
        return [("novelty", summary["novelty"])] if summary.get("novelty") is not None else []


class Distribution(Metric):
    """Wasserstein distances of density and element count to the test set; coverage where fingerprinted."""

    needs = ("test",)

    def compute(self, inputs):
        valid, test = inputs.valid, inputs.test
        result = {"wasserstein": distribution.wasserstein_distances(
            [r.density for r in valid], [r.n_elements for r in valid],
            [r.density for r in test], [r.n_elements for r in test]), "test_size": len(test)}
        with_fp = [r for r in valid if r.structure_fp is not None]
        test_fp = [r for r in test if r.structure_fp is not None]
        if with_fp and test_fp:
            cutoffs = inputs.coverage_cutoffs or distribution.MP20_COVERAGE_CUTOFFS
            result["coverage"] = distribution.coverage(
                np.array([r.structure_fp for r in with_fp]), np.array([r.composition_fp for r in with_fp]),
                np.array([r.structure_fp for r in test_fp]), np.array([r.composition_fp for r in test_fp]),
                cutoffs["structure"], cutoffs["composition"])
        return result

    def rows(self, summary):
        return _group_rows("wasserstein", summary.get("wasserstein")) + _group_rows("coverage",
                                                                                    summary.get("coverage"))


class CSP(Metric):
    """Match rate and mean RMS at each n against the CSP targets (`csp.evaluate_csp`)."""

    needs = ("csp", "csp_targets")

    def compute(self, inputs):
        task, targets = inputs.csp, inputs.csp_targets
        return {"csp": evaluate_csp(inputs.records, targets, task.attempts, task.ranking, inputs.num_proc,
                                    inputs.ray),
                "csp_targets": f"{task.targets}" + (f" ({task.ids_file}, {len(targets)} ids)" if task.ids_file
                                                    else "")}

    def rows(self, summary):
        return _group_rows("csp", summary.get("csp"))


class Stability(Metric):
    """Relaxation, E_hull and the stable share; S.U.N. with a reference (`relaxation.summarize_stability`)."""

    needs = ("stability",)
    TABLE = ("relaxed", "failed", "stable_rate", "sun_rate", "median_e_above_hull", "median_rmsd",
             "stopped_by_time", "core_seconds_per_structure")

    def compute(self, inputs):
        task = inputs.stability
        candidates = [(r.name, r.structure) for r in inputs.scored if r.structural_valid]
        results = stability_records(candidates, task.cache, task.settings, num_proc=inputs.num_proc,
                                    progress=inputs.progress, ray=inputs.ray)
        with_novelty = inputs.reference is not None
        summary = summarize_stability(results, len(inputs.records), inputs.unique if with_novelty else None,
                                      inputs.novel if with_novelty else None, task.settings)
        return {"stability": summary | {"cache": str(task.cache), "settings": dataclasses.asdict(task.settings)}}

    def rows(self, summary):
        stability = summary.get("stability") or {}
        return [(f"stability: {key.replace('_', ' ')}", stability[key]) for key in self.TABLE
                if stability.get(key) is not None]


class Generation(Metric):
    """A generate run's speed and the distance floor's dead ends, from its journal."""

    needs = ("journal",)

    def compute(self, inputs):
        entries = inputs.journal
        seconds = sum(e["seconds"] for e in entries)
        tokens = sum(e["tokens"] for e in entries)
        return {"generation": {
            "seconds": seconds, "refine_seconds": sum(e.get("refine_seconds", 0.0) for e in entries),
            "structures_per_second": len(entries) / seconds if seconds else None,
            "tokens_per_second": tokens / seconds if seconds else None,
            "tokens_per_structure": tokens / len(entries) if entries else None,
            # Dead ends of the distance floor: samples drawn again, and kept below the floor.
            "resampled": sum(1 for e in entries if e.get("resamples")),
            "below_floor": sum(1 for e in entries if e.get("fallbacks"))}}

    def rows(self, summary):
        return [(f"generation: {key.replace('_', ' ')}", value)
                for key, value in (summary.get("generation") or {}).items()
                if value and key != "seconds"]  # refine seconds only when a head ran


# In the order of the table.
METRICS: tuple[Metric, ...] = (Counts(), Skipped(), ParseRate(), Validity(), Symmetry(), SelfConsistency(),
                               Uniqueness(), Novelty(), Distribution(), CSP(), Stability(), Generation())


def summarize(inputs: MetricInputs, metrics: tuple[Metric, ...] = METRICS) -> dict:
    """The summary: each metric that applies to `inputs`, in turn (see the module's example)."""
    summary: dict = {}
    for metric in metrics:
        if metric.applies(inputs):
            summary.update(metric.compute(inputs))
    return summary


def markdown_table(summary: dict, metrics: tuple[Metric, ...] = METRICS) -> str:
    """The headline numbers of a summary as a Markdown table (also printed by `crystallm evaluate`)."""
    rows = [row for metric in metrics for row in metric.rows(summary)]
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value:.4f} |" if isinstance(value, float) else f"| {name} | {value} |"
              for name, value in rows]
    return "\n".join(lines)


def write_markdown(summary: dict, path: str | Path) -> None:
    """A Markdown report: what was evaluated against what, then the table."""
    lines = [f"# crystallm evaluate {summary.get('input', '')}", ""]
    for key in ("reference", "test", "csp_targets", "seconds", "structures_per_second"):
        if summary.get(key) is not None:
            lines.append(f"- {key}: {summary[key]}")
    for key, note in (summary.get("stability") or {}).get("approximations", {}).items():
        lines.append(f"- stability, {key}: {note}")
    Path(path).write_text("\n".join(lines + ["", markdown_table(summary), ""]))
