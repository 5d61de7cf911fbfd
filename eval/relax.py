"""Stage: a short CHGNet relaxation of the first structurally valid structures of generated folders, to compare
them (mean energy per atom and mean displacement).

    python eval/relax.py configs/eval-relax-refiner.yaml
"""

import json
import statistics
import time
from pathlib import Path

from crystallm.evaluation import readers, scoring
from crystallm.evaluation.relaxation import relax_structures
from crystallm.stage_config import read_stage_config


def main() -> None:
    config = read_stage_config(__doc__)
    summary = {"steps": config["steps"], "fmax": config["fmax"], "limit": config["limit"], "runs": {}}
    scored = {label: {r.name: r for r in scoring.score_entries(readers.iter_entries(folder), num_proc=1)}
              for label, folder in config["inputs"].items()}
    # The same samples in every run: the first `limit` names structurally valid in all of them.
    names = [name for name in next(iter(scored.values()))
             if all(name in s and not s[name].error and s[name].structural_valid for s in scored.values())]
    names = names[: int(config["limit"])]
    for label, folder in config["inputs"].items():
        chosen = [scored[label][name].structure for name in names]
        started = time.perf_counter()
        results = relax_structures(chosen, steps=int(config["steps"]), fmax=float(config["fmax"]))
        done = [r for r in results if not r["error"]]
        summary["runs"][label] = {
            "input": folder, "structures": len(chosen), "relaxed": len(done),
            "mean_energy_per_atom": statistics.fmean(r["energy_per_atom"] for r in done),
            "mean_initial_energy_per_atom": statistics.fmean(r["initial_energy_per_atom"] for r in done),
            "mean_displacement": statistics.fmean(r["mean_displacement"] for r in done),
            "median_displacement": statistics.median(r["mean_displacement"] for r in done),
            "seconds": time.perf_counter() - started}
        print(label, json.dumps(summary["runs"][label]), flush=True)
    (Path(config["output_dir"]) / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
