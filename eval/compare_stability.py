"""Stage: two stability runs over the same structures (two arms, e.g. the refinement head off and on, or two
potentials), compared structure by structure from their relaxation caches: each arm's medians and means over the
structures relaxed in both, and how often, and by how much, the second arm is lower. A structure whose relaxation
the time cap ended in either arm is left out (its figures follow the machine's load; `relaxation.stopped_by_time`)
and counted. Each arm is placed on the hull (`hull`, default the shipped one) with its potential's MP2020 choice.

    python eval/compare_stability.py configs/experiments/eval-stability-compare-refiner.yaml

Writes `<output_dir>/summary.json` and `summary.md`.
"""

from pathlib import Path

import numpy as np

from crystallm.evaluation import reports
from crystallm.evaluation.hull import HULL_FILE, ReferenceHull, place_on_hull
from crystallm.evaluation.relaxation import MP2020_BY_DEFAULT, stopped_by_time
from crystallm.stage_config import read_stage_config

MEASURES = ("rmsd", "initial_energy_per_atom", "energy_per_atom", "steps", "e_above_hull")


def main() -> None:
    config = read_stage_config(__doc__)
    hull = ReferenceHull.from_file(config.get("hull", HULL_FILE))
    arms = {name: {r["name"]: place_on_hull(r, hull, MP2020_BY_DEFAULT[r["settings"]["potential"]])
                   for r in reports.read_json_lines(cache)}
            for name, cache in config["arms"].items()}
    (first, one), (second, two) = arms.items()
    relaxed = [n for n in one if n in two and not one[n]["error"] and not two[n]["error"]]
    timed_out = {n for n in relaxed if any(stopped_by_time(arm[n], arm[n]["settings"]["steps"]) for arm in (one, two))}
    names = [n for n in relaxed if n not in timed_out]
    summary = {"arms": config["arms"], "hull": config.get("hull", "shipped"), "compared": len(names),
               "stopped_by_time": len(timed_out), "per_arm": {}, "paired": {}}
    for arm, records in arms.items():
        summary["per_arm"][arm] = {f"median_{m}": float(np.median([records[n][m] for n in names])) for m in MEASURES}
        summary["per_arm"][arm]["stable_share"] = float(np.mean([records[n]["stable"] for n in names]))
    for measure in MEASURES:
        difference = np.array([two[n][measure] - one[n][measure] for n in names])
        summary["paired"][measure] = {f"share_{second}_lower": float(np.mean(difference < 0)),
                                      "median_difference": float(np.median(difference))}
    out = Path(config["output_dir"])
    reports.write_json(summary, out / "summary.json")
    rows = [f"| over {len(names)} structures | {first} | {second} | share where {second} is lower | median "
            f"difference |", "|---|---|---|---|---|"]
    rows += [f"| median {m} | {summary['per_arm'][first][f'median_{m}']:.4f} | "
             f"{summary['per_arm'][second][f'median_{m}']:.4f} | "
             f"{summary['paired'][m][f'share_{second}_lower']:.3f} | {summary['paired'][m]['median_difference']:.4f} |"
             for m in MEASURES]
    rows.append(f"| stable share | {summary['per_arm'][first]['stable_share']:.3f} | "
                f"{summary['per_arm'][second]['stable_share']:.3f} | | |")
    rows.append(f"\n{len(timed_out)} structures left out: the time cap ended their relaxation in one arm or both.")
    (out / "summary.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
