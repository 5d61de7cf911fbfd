"""Inverse design (`crystallm design`): property targets -> candidates -> a screened, ranked shortlist.

Candidates come from each target's property adapter with classifier-free guidance (split evenly between the
targets), then pass a funnel, counted at every stage: parsed -> valid (structural and compositional) -> unique
(StructureMatcher, across all candidates) -> novel (matching no structure of the model's training corpus) ->
within tolerance of every target by the surrogate predictors shipped with the model -> relaxed by CHGNet with
E_hull under a threshold (the approximate hull of `crystallm.evaluation.hull`).

Ranking score (lower is better), documented in every report: the mean over the targets of
|predicted - target| / tolerance, plus max(E_hull, 0) / the E_hull threshold, plus 0.5 for a structure spglib
finds no symmetry in (P1 at symprec 0.1).

Each stage writes what it has as it goes; a killed run restarts where it stopped (generation folders and the
relaxation cache are resumable).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pymatgen.core import Composition, Structure

from crystallm.adapters import available_adapters, use_adapter
from crystallm.errors import CrystaLLMInputError
from crystallm.evaluation import matching, reports
from crystallm.evaluation.reference import ReferenceSet
from crystallm.evaluation.relaxation import RelaxationSettings, stability_records
from crystallm.generation.conditioning import check_target
from crystallm.generation.prompt import Prompt, parse_chemical_system
from crystallm.generation.run_folder import GenerationFolder, generate_into
from crystallm.generation.settings import SamplingSettings
from crystallm.io import cif
from crystallm.model_folder import TRAINING_CORPUS, loaded_from
from crystallm.properties.surrogates import load_surrogate
from crystallm.validity import compositional_validity

DEFAULT_TOLERANCES = {"band_gap": 0.5, "formation_energy_per_atom": 0.25, "e_above_hull": 0.05,
                      "bulk_modulus": 20.0, "shear_modulus": 15.0}  # the conditional benchmark's, where it has one
P1_PENALTY = 0.5


@dataclass(frozen=True)
class Target:
    """A property target with its tolerance (in the property's unit)."""

    property_name: str
    value: float
    tolerance: float

    @classmethod
    def parse(cls, text: str) -> "Target":
        """'band_gap=2.0' or 'band_gap=2.0:0.3' (value and tolerance). An unknown property lists the known
        ones; a value outside the conditioned range warns.

        >>> Target.parse("band_gap=2.0")
        Target(property_name='band_gap', value=2.0, tolerance=0.5)
        """
        name, _, rest = text.partition("=")
        value, _, tolerance = rest.partition(":")
        try:
            number = float(value)
            width = float(tolerance) if tolerance else DEFAULT_TOLERANCES.get(name.strip(), math.nan)
        except ValueError:
            raise CrystaLLMInputError(f"target {text!r}: expected PROPERTY=VALUE[:TOLERANCE], e.g. band_gap=2.0")
        check_target(name.strip(), number)  # unknown property: error; out of range: warning
        if not width > 0:
            raise CrystaLLMInputError(f"target {text!r}: give a positive tolerance, e.g. {name}={value}:0.5")
        return cls(name.strip(), number, width)


@dataclass
class DesignPlan:
    """Checked inputs of a design run: nothing is computed before every check has passed."""

    targets: list[Target]
    elements: tuple[str, ...] = ()
    num: int = 2000
    top: int = 50
    e_hull_max: float = 0.1
    sampling: SamplingSettings = SamplingSettings(batch_size=32, guidance=2.0)  # each target's generation
    relaxation: RelaxationSettings = field(default_factory=RelaxationSettings)


def neutral_example(elements: tuple[str, ...], max_count: int = 6) -> str | None:
    """A reduced formula of exactly these elements (each at most `max_count` times) that passes SMACT's charge
    neutrality and electronegativity test, or None if there is none. The smallest such formula comes first (an
    existence check, not a prediction: SMACT allows mixed valence, so LiFeO passes with Fe(+1)).

    >>> neutral_example(("Ga", "As")), neutral_example(("Li", "Fe", "O")), neutral_example(("Ne", "F"))
    ('GaAs', 'LiFeO', None)
    """
    candidates = []
    for counts in itertools.product(range(1, max_count + 1), repeat=len(elements)):
        if math.gcd(*counts) == 1:
            candidates.append((sum(counts), counts))
    for _, counts in sorted(candidates):
        composition = Composition(dict(zip(elements, counts)))
        if compositional_validity(composition):
            return composition.reduced_formula
    return None


def plan_design(model_folder: Path, targets: list[str], elements: str | None = None, **options) -> DesignPlan:
    """Check a design request before any compute is spent: each target's property must have an adapter and a
    surrogate beside the model, and the model its training corpus (the novelty reference); targets outside the
    data warn; an element list must be able to make a charge-neutral compound (SMACT). Raises CrystaLLMInputError
    naming the problem.

    >>> from crystallm.model_folder import DEFAULT_MODEL
    >>> plan_design(Path(DEFAULT_MODEL), ["band_gap=2.0"], "Li-Fe-P-O").elements
    ('Li', 'Fe', 'P', 'O')
    """
    if not targets:
        raise CrystaLLMInputError("give at least one --target PROPERTY=VALUE, e.g. --target band_gap=2.0")
    parsed = [Target.parse(text) for text in targets]
    adapters = available_adapters(model_folder)
    for target in parsed:
        if target.property_name not in adapters:
            raise CrystaLLMInputError(f"no adapter for {target.property_name} beside the model in {model_folder}; "
                                      f"available: {', '.join(adapters) or 'none'}")
        load_surrogate(model_folder / "surrogates" / target.property_name)  # missing, a pickle, unsafe: refused now
    if not (model_folder / TRAINING_CORPUS).exists():
        raise CrystaLLMInputError(f"no novelty reference in {model_folder}: {TRAINING_CORPUS} (the texts the model "
                                  f"was trained on) is missing; copy the corpus there (train/export_model.py does)")
    if len({t.property_name for t in parsed}) != len(parsed):
        raise CrystaLLMInputError("each property may be targeted once")
    chosen = parse_chemical_system(elements.replace(",", "-")) if elements else ()
    if chosen and neutral_example(chosen) is None:
        raise CrystaLLMInputError(f"elements {'-'.join(chosen)}: no charge-neutral compound of exactly these "
                                  f"elements with up to 6 atoms of each passes SMACT's test; nothing to design")
    return DesignPlan(parsed, chosen, **options)


def score(predicted: dict[str, float], targets: list[Target], e_hull: float, e_hull_max: float,
          space_group: int | None) -> float:
    """The ranking score of a candidate (lower is better; see the module's notes).

    >>> score({"band_gap": 2.25}, [Target("band_gap", 2.0, 0.5)], 0.05, 0.1, 225)
    1.0
    """
    distance = np.mean([abs(predicted[t.property_name] - t.value) / t.tolerance for t in targets])
    return float(distance + max(e_hull, 0.0) / e_hull_max + (P1_PENALTY if space_group in (None, 1) else 0.0))


def run_design(model, tokenizer, plan: DesignPlan, out: str | Path, progress: bool = True) -> dict:
    """Run a checked plan into the folder `out`: `generated/<property>/` (resumable generation), `stability.jsonl`
    (relaxations, resumable), `candidates.csv` (every candidate that reached the surrogate screen),
    `shortlist.csv` and `shortlist/*.cif` (the relaxed structures of the best `top`), `funnel.json` and
    `report.md` with `funnel.png` and `property_vs_e_hull.png`. Returns the funnel.
    """
    out = Path(out)
    folder_of_model = loaded_from(model)
    per_target = math.ceil(plan.num / len(plan.targets))
    entries, records = [], []
    for target in plan.targets:  # stage 1: generate with each target's adapter, guided
        model = use_adapter(model, target.property_name)
        prompt = Prompt.of(chemical_system="-".join(plan.elements) if plan.elements else None,
                           property_name=target.property_name, target=target.value)
        folder = GenerationFolder(out / "generated" / target.property_name, plan.sampling,
                                  {"adapter": target.property_name, "prompt": prompt.describe(), "num": per_target},
                                  resume=True)
        generate_into(folder, model, tokenizer, prompt, num=per_target, progress=progress)
        entries += [e | {"name": f"{target.property_name}-{e['name']}"} for e in folder.entries]
        records += folder.records
    funnel = {"generated": len(entries)}
    parsed = [i for i, r in enumerate(records) if not r.error]
    funnel["parsed"] = len(parsed)
    valid = [i for i in parsed if records[i].valid]
    funnel["valid"] = len(valid)
    structures = {i: records[i].structure for i in valid}
    unique = [i for i, keep in zip(valid, matching.unique_mask([structures[i] for i in valid])) if keep]
    funnel["unique"] = len(unique)
    reference = ReferenceSet.from_collection(folder_of_model / TRAINING_CORPUS)
    novel = [i for i, keep in zip(unique, reference.novel_mask([structures[i] for i in unique])) if keep]
    funnel["novel"] = len(novel)

    predicted: dict[int, dict[str, float]] = {i: {} for i in novel}
    for target in plan.targets:  # stage 2: the surrogates, on the base model's embeddings
        predictor, _ = load_surrogate(folder_of_model / "surrogates" / target.property_name)
        values = predictor.predict(model, tokenizer, [entries[i]["text"] for i in novel]) if novel else []
        for i, value in zip(novel, values):
            predicted[i][target.property_name] = float(value)
    within = [i for i in novel if all(abs(predicted[i][t.property_name] - t.value) <= t.tolerance
                                      for t in plan.targets)]
    funnel["within_tolerance"] = len(within)

    relaxed = stability_records([(entries[i]["name"], structures[i]) for i in within], out / "stability.jsonl",
                                plan.relaxation, progress=progress)  # stage 3: CHGNet and the hull
    stable = [(i, r) for i, r in zip(within, relaxed) if not r["error"] and r["e_above_hull"] < plan.e_hull_max]
    funnel["stable"] = len(stable)
    rows = []
    for i, result in zip(within, relaxed):
        rows.append({"name": entries[i]["name"], "formula": records[i].formula,
                     "space_group": records[i].space_group_0_1,
                     **{f"predicted_{k}": round(v, 4) for k, v in predicted[i].items()},
                     "e_above_hull": None if result["error"] else round(result["e_above_hull"], 4),
                     "relax_error": result["error"], "formula_in_training_data": records[i].formula in reference.groups,
                     "score": None if result["error"] else round(score(predicted[i], plan.targets,
                                                                       result["e_above_hull"], plan.e_hull_max,
                                                                       records[i].space_group_0_1), 4)})
    reports.write_csv(rows, out / "candidates.csv")
    by_name = {entries[i]["name"]: r for i, r in stable}
    shortlist = sorted((row for row in rows if row["name"] in by_name), key=lambda row: row["score"])[:plan.top]
    (out / "shortlist").mkdir(parents=True, exist_ok=True)
    for rank, row in enumerate(shortlist, 1):
        row["rank"], row["cif"] = rank, f"shortlist/{rank:03d}-{row['formula']}.cif"
        relaxed_structure = Structure.from_dict(by_name[row["name"]]["relaxed"])
        (out / row["cif"]).write_text(cif.structure_to_cif(relaxed_structure))
    reports.write_csv([{"rank": r.pop("rank"), **r} for r in shortlist], out / "shortlist.csv")
    funnel_report = {"funnel": funnel, "targets": [vars(t) for t in plan.targets], "elements": plan.elements,
                     "guidance": plan.sampling.guidance, "e_hull_max": plan.e_hull_max,
                     "score": __doc__.split("\n\n")[2]}
    reports.write_json(funnel_report, out / "funnel.json")
    _write_report(out, funnel_report, rows, shortlist, plan)
    return funnel


def _write_report(out: Path, funnel_report: dict, rows: list[dict], shortlist: list[dict], plan: DesignPlan) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    funnel = funnel_report["funnel"]
    figure, axis = plt.subplots(figsize=(7, 3.2))
    axis.barh(list(funnel)[::-1], list(funnel.values())[::-1], color="tab:blue")
    axis.set(xlabel="candidates", title="design funnel")
    figure.tight_layout()
    figure.savefig(out / "funnel.png", dpi=110)
    plt.close(figure)
    first = plan.targets[0]
    figure, axis = plt.subplots(figsize=(5, 3.6))
    points = [(r[f"predicted_{first.property_name}"], r["e_above_hull"]) for r in rows if r["e_above_hull"] is not None]
    if points:
        axis.scatter(*zip(*points), s=10, alpha=0.6)
    axis.axhline(plan.e_hull_max, color="black", lw=0.8, ls="--")
    axis.axvline(first.value, color="tab:red", lw=0.8)
    axis.set(xlabel=f"predicted {first.property_name} (surrogate)", ylabel="E_hull (eV/atom, CHGNet)")
    figure.tight_layout()
    figure.savefig(out / "property_vs_e_hull.png", dpi=110)
    plt.close(figure)
    wanted = ", ".join(f"{t.property_name} = {t.value} ± {t.tolerance}" for t in plan.targets)
    lines = ["# crystallm design", "", f"Targets: {wanted}"
             f"; elements: {'-'.join(plan.elements) or 'any'}; guidance {plan.sampling.guidance}; "
             f"E_hull < {plan.e_hull_max} eV/atom.", "", "| stage | candidates |", "|---|---|"]
    lines += [f"| {stage} | {count} |" for stage, count in funnel.items()]
    lines += ["", "![funnel](funnel.png) ![property vs E_hull](property_vs_e_hull.png)", "",
              f"Score: {funnel_report['score']}", "", "## Shortlist", ""]
    if shortlist:
        keys = [k for k in shortlist[0] if k not in ("name", "relax_error")]
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(str(row[k]) for k in keys) + " |" for row in shortlist]
    else:
        lines.append("No candidate passed every stage.")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps({"funnel": funnel_report, "shortlist": shortlist}, indent=1))
