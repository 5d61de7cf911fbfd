# Compares the head-off and head-on CHGNet caches over the samples relaxed in both (issue 19, partial run).
# python results/refiner-geometry/stability-partial/compare_caches.py
import json, numpy as np
from crystallm.evaluation import reports
from crystallm.evaluation.hull import ReferenceHull, place_on_hull
hull = ReferenceHull.from_file()
off = {r["name"]: r for r in reports.read_json_lines("results/stability/floor-1000/stability.jsonl")}
on = {r["name"]: r for r in reports.read_json_lines("results/stability/refined-1000/stability.jsonl")}
names = [n for n in on if n in off and not on[n]["error"] and not off[n]["error"]]
print("compared", len(names))
for label, cache in (("off", off), ("on", on)):
    recs = [place_on_hull(cache[n], hull, False) for n in names]
    print(label, "median rmsd %.4f" % np.median([r["rmsd"] for r in recs]),
          "mean E0 %.3f" % np.mean([r["initial_energy_per_atom"] for r in recs]),
          "mean E %.3f" % np.mean([r["energy_per_atom"] for r in recs]),
          "median steps", np.median([r["steps"] for r in recs]),
          "converged", sum(r["converged"] for r in recs),
          "stable %.3f" % np.mean([r["stable"] for r in recs]))
