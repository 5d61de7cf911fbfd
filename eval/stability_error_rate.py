"""Stage: how often the stability check is wrong, on materials whose DFT answer is known (issue "Stability a
materials scientist can trust"): Matbench Discovery's protocol on this machine, smaller.

    python eval/stability_error_rate.py configs/experiments/eval-stability-error-rate.yaml

- Labels: a seeded sample of `sample` WBM rows (../shared/data/wbm: DFT formation energies) placed on MP's hull
  (`eval/mp_hull.py` writes it) give DFT E_hull values.
- Each potential relaxes the first `count` structures (`potentials`: name -> count; `relaxation` settings; caches
  `relax-<potential>.jsonl`, resumable), and
  its energy is placed on each hull: MP's, and the shipped approximate hull rebuilt without the sampled rows (it
  holds the WBM rows themselves: each would find its own DFT energy on it). A third row of each hull places the
  DFT formation energies themselves: the hull's own share of the error.
- Per potential x hull (x MP2020 corrections on top of the potential's energy or not): precision, recall, F1 and
  the false-positive rate at Matbench Discovery's cut (E_hull <= 0) and at ours (0.1), the E_hull MAE against DFT,
  core-seconds per structure. `summary.json` and `summary.md` in `output_dir`.
"""

import random
from pathlib import Path

import numpy as np

from crystallm import data
from crystallm.evaluation import reports
from crystallm.evaluation.hull import ReferenceHull, composition_of_cif, place_on_hull
from crystallm.evaluation.relaxation import RelaxationSettings, stability_classification, stability_records
from crystallm.io import cif
from crystallm.stage_config import read_stage_config


def _sample(config: dict, mp: ReferenceHull) -> list[dict]:
    """The seeded WBM sample with DFT labels: name, composition, structure, formation energy, E_hull on MP's hull."""
    rows = data.load_source("wbm/val")
    order = list(range(rows.num_rows))
    random.Random(config["seed"]).shuffle(order)
    sample = []
    for index in order:
        row = rows[index]
        composition = composition_of_cif(row["cif"])
        try:
            e_hull = mp.e_above_hull_of_formation(composition, row["formation_energy_per_atom"])
        except (ValueError, TypeError):  # an element without a reference energy, or no energy
            continue
        sample.append({"name": f"wbm-{index}", "composition": composition, "cif": row["cif"],
                       "formation": row["formation_energy_per_atom"], "dft_e_hull": e_hull})
        if len(sample) == config["sample"]:
            return sample
    return sample


def _rows(label: str, predicted: list[float], known: list[float], seconds: float | None, cuts) -> list[dict]:
    return [{"method": label, "core_seconds_per_structure": seconds, **stability_classification(predicted, known, cut)}
            for cut in cuts]


def main() -> None:
    config = read_stage_config(__doc__)
    out = Path(config["output_dir"])
    mp = ReferenceHull.from_file(config["mp_hull"])
    sample = _sample(config, mp)
    picked = {(row["composition"].reduced_formula, row["formation"]) for row in sample}
    full = ReferenceHull.from_shared_data()
    approximate = ReferenceHull([(c, e) for c, e in full.formation_energies if (c.reduced_formula, e) not in picked],
                                full.elemental_energies)
    hulls = {"MP hull": mp, "shipped hull without the sample": approximate}
    known = np.array([row["dft_e_hull"] for row in sample])
    cuts = config.get("cuts", [0.0, 0.1])
    table = []
    dft = {name: np.array([hull.e_above_hull_of_formation(row["composition"], row["formation"]) for row in sample])
           for name, hull in hulls.items()}
    for hull_name, e_hull in dft.items():
        table += _rows(f"DFT energies, {hull_name}", e_hull, known, None, cuts)
    structures = [(row["name"], cif.structure_from_cif(row["cif"], row["name"])) for row in sample]
    failures = {}
    for potential, count in config["potentials"].items():  # each relaxes the first `count` of the sample
        settings = RelaxationSettings(**config.get("relaxation", {}), potential=potential)
        records = stability_records(structures[:count], out / f"relax-{potential}.jsonl", settings,
                                    num_proc=config.get("num_proc"))
        relaxed = [i for i, record in enumerate(records) if not record["error"]]
        failures[potential] = len(records) - len(relaxed)
        seconds = float(np.mean([record["seconds"] for record in records]))
        paired = min(config["potentials"].values())  # the rows every potential relaxed: a paired comparison
        for mp2020 in config.get("mp2020", [False]):
            for hull_name, hull in hulls.items():
                placed = [place_on_hull(records[i], hull, mp2020) for i in relaxed]
                ok = [i for i, record in zip(relaxed, placed) if not record["error"]]
                predicted = np.array([record["e_above_hull"] for record in placed if not record["error"]])
                label = f"{potential}{' + MP2020' if mp2020 else ''}, {hull_name}"
                table += _rows(label, predicted, known[ok], seconds, cuts)
                if count > paired:
                    first = np.array(ok) < paired
                    table += _rows(f"{label} (first {paired})", predicted[first], known[ok][first], seconds, cuts)
    # The shipped hull's bias: the same DFT energies on it (without the sample) minus on MP's hull.
    bias = dft["shipped hull without the sample"] - known
    summary = {"shipped_hull_bias": {"median": float(np.median(bias)), "mean": float(np.mean(bias)),
                                     "p05": float(np.percentile(bias, 5)), "p95": float(np.percentile(bias, 95)),
                                     "share_lower_by_over_0_05": float(np.mean(bias < -0.05)),
                                     "share_higher_by_over_0_05": float(np.mean(bias > 0.05))},
               "sample": len(sample), "unstable_over_0_1": int((known > 0.1).sum()),
               "stable_at_0": int((known <= 0).sum()), "seed": config["seed"], "relaxation": config.get("relaxation"),
               "failed_relaxations": failures, "table": table}
    reports.write_json(summary, out / "summary.json")
    lines = ["| method | cut | n | precision | recall | F1 | false-positive rate | E_hull MAE | core-s/structure |",
             "|---|---|---|---|---|---|---|---|---|"]
    number = lambda value: "-" if value is None else f"{value:.3f}"  # noqa: E731
    lines += [f"| {r['method']} | {r['cut']} | {r['n']} | {number(r['precision'])} | {number(r['recall'])} | "
              f"{number(r['f1'])} | {number(r['false_positive_rate'])} | {number(r['mae'])} | "
              f"{number(r['core_seconds_per_structure'])} |" for r in table]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
