"""Stage: generation speed of a model (docs/architecture.md, Speed): structures/s and tokens/s at each batch
size, the median of several runs.

    python eval/generation_speed.py configs/experiments/eval-generation-speed-default.yaml
"""

import json
import platform
from pathlib import Path

import torch

from crystallm.compute import bf16_pays
from crystallm.generation.sampling import load_generator, measure_speed
from crystallm.generation.settings import SamplingSettings
from crystallm.stage_config import read_stage_config


def main() -> None:
    config = read_stage_config(__doc__)
    model, tokenizer = load_generator(config.get("model"))
    bf16 = bf16_pays() if config.get("bf16") is None else config["bf16"]
    summary = {"model": config.get("model") or "default", "machine": f"{platform.machine()}, "
               f"{torch.get_num_threads()} torch threads, {'cuda' if torch.cuda.is_available() else 'cpu'}",
               "bf16": bf16, "results": []}
    # Each arm is a set of sampling settings (e.g. the grammar off, or another distance floor).
    for arm in config.get("arms", [{}]):
        for batch_size, num in config["batches"].items():
            settings = SamplingSettings(batch_size=int(batch_size), bf16=bf16, **arm)
            result = measure_speed(model, tokenizer, int(num), settings, config.get("repeats", 3))
            summary["results"].append({"arm": arm, **result})
            print(json.dumps({"arm": arm, **{k: v for k, v in result.items() if k != "runs"}}), flush=True)
    (Path(config["output_dir"]) / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
