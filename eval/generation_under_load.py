"""Stage: generation speed alone and beside a CPU-bound neighbour, for torch thread counts chosen several ways
(issue 36; docs/scaling.md, "Threads and bf16"): structures/s, the median of several runs, at each batch size.

    python eval/generation_under_load.py configs/experiments/eval-generation-under-load.yaml

`threads`: each arm's thread count, a number or `free` (what `crystallm generate` now chooses: the cores free to
the process). `neighbours`: `none`, or `busy` (a one-thread busy loop in another process, started before the arm
and stopped after it). Every arm autocasts as the probe (`bf16_pays`) chose; `bf16_alone` adds the other choice
(alone, free cores).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from crystallm.compute import bf16_pays, free_cores, use_threads
from crystallm.generation.sampling import load_generator, measure_speed
from crystallm.generation.settings import SamplingSettings
from crystallm.stage_config import read_stage_config

NEIGHBOURS = {"none": None, "busy": [sys.executable, "-c", "while True: pass"]}


def main() -> None:
    config = read_stage_config(__doc__)
    model, tokenizer = load_generator(config.get("model"))
    summary = {"model": config.get("model") or "default", "cores": len(os.sched_getaffinity(0)),
               "bf16_probe": bf16_pays(), "results": []}
    arms = [(neighbour, threads, summary["bf16_probe"], batch) for neighbour in config["neighbours"]
            for threads in config["threads"] for batch in config["batch_sizes"]]
    arms += [("none", "free", bf16, batch) for bf16 in config.get("bf16_alone", []) for batch in config["batch_sizes"]
             if bf16 != summary["bf16_probe"]]  # the probe's choice is measured above
    for neighbour, threads, bf16, batch in arms:
        process = subprocess.Popen(NEIGHBOURS[neighbour]) if NEIGHBOURS[neighbour] else None
        try:
            time.sleep(1.0)  # the neighbour is running before the threads are chosen
            chosen = use_threads(None if threads == "free" else int(threads))
            result = measure_speed(model, tokenizer, int(config["num"]),
                                   SamplingSettings(batch_size=batch, bf16=bf16), int(config.get("repeats", 3)))
        finally:
            if process:
                process.kill()
                process.wait()
        row = {"neighbour": neighbour, "threads": threads, "threads_used": chosen, "bf16": bf16, "batch_size": batch,
               "structures_per_second": result["end_to_end_structures_per_second"],
               "runs": [run["end_to_end_structures_per_second"] for run in result["runs"]]}
        summary["results"].append(row)
        print(json.dumps(row), flush=True)
    summary["free_cores_now"] = free_cores()
    torch.set_num_threads(summary["cores"])
    (Path(config["output_dir"]) / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
