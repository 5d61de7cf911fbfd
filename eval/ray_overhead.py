"""Stage: what running the scoring and relaxation workers on Ray costs against the local pool, on one machine:
the same collection scored (and a slice of it relaxed by CHGNet) by each, wall seconds and their ratio, and a
check that both give the same results.

    python eval/ray_overhead.py configs/experiments/eval-ray-overhead.yaml
"""

import time
from pathlib import Path

from crystallm.evaluation import reports
from crystallm.evaluation.batch import EvaluationOptions, evaluate
from crystallm.evaluation.readers import iter_entries
from crystallm.evaluation.relaxation import RelaxationSettings, stability_records
from crystallm.evaluation.scoring import score_entries
from crystallm.stage_config import read_stage_config


def _stop_ray() -> None:
    """Shut down the Ray instance an arm started, so that its daemons do not slow the next local arm."""
    import ray

    ray.shutdown()


def main() -> None:
    config = read_stage_config(__doc__)
    out = Path(config["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    processes = int(config["num_proc"])
    summary = {"input": config["input"], "num_proc": processes, "ray": config["ray"]}
    scored = {}
    for pool, ray in (("local", None), ("ray", config["ray"])):
        started = time.perf_counter()
        result = evaluate(config["input"], options=EvaluationOptions(num_proc=processes, ray=ray, progress=False))
        summary[f"scoring_seconds_{pool}"] = time.perf_counter() - started
        scored[pool] = {key: result[key] for key in ("entries", "validity", "uniqueness")}
        if ray:
            _stop_ray()
    summary["scoring_entries"] = scored["local"]["entries"]
    summary["scoring_same_results"] = scored["local"] == scored["ray"]
    summary["scoring_ratio"] = summary["scoring_seconds_ray"] / summary["scoring_seconds_local"]

    records = [r for r in score_entries(iter_entries(config["input"]), num_proc=1) if not r.error]
    structures = [(r.name, r.structure) for r in records if r.structural_valid][: int(config["relax_count"])]
    settings = RelaxationSettings(**config["relaxation"])
    relaxed = {}
    for pool, ray in (("local", None), ("ray", config["ray"])):
        cache = out / f"stability-{pool}.jsonl"
        cache.unlink(missing_ok=True)
        started = time.perf_counter()
        relaxed[pool] = stability_records(structures, cache, settings, num_proc=processes, progress=False, ray=ray)
        summary[f"relaxation_seconds_{pool}"] = time.perf_counter() - started
        if ray:
            _stop_ray()
    summary["relaxed"] = len(structures)
    summary["relaxation_max_energy_difference"] = max(
        abs(a["energy_per_atom"] - b["energy_per_atom"]) for a, b in zip(relaxed["local"], relaxed["ray"])
        if not a["error"] and not b["error"])
    summary["relaxation_ratio"] = summary["relaxation_seconds_ray"] / summary["relaxation_seconds_local"]
    reports.write_json(summary, out / "summary.json")
    print(summary)


if __name__ == "__main__":
    main()
