"""Stage: the share of sampled texts that parse, and that are structurally valid, with the grammar and its
distance floor, with the grammar alone, and without either.

    python eval/parse_rate.py configs/experiments/eval-parse-rate-untrained.yaml

`model` is a saved model directory, or absent for an untrained model built from `untrained_model` (the worst
case for the grammar). Writes `<output_dir>/summary.json` and the first failures.
"""

import json
import time
from pathlib import Path

import torch

from crystallm.configuration import CrystaLLMConfig
from crystallm.generation.sampling import generate_structures
from crystallm.generation.settings import SamplingSettings
from crystallm.modeling import CrystaLLMForCausalLM, load_model
from crystallm.stage_config import read_stage_config
from crystallm.tokenization import CrystaLLMTokenizer
from crystallm.validity import structural_validity


def main() -> None:
    config = read_stage_config(__doc__)
    tokenizer = CrystaLLMTokenizer.from_format()
    if config.get("model"):
        model = load_model(config["model"])
    else:
        torch.manual_seed(config.get("seed", 0))
        model = CrystaLLMForCausalLM(CrystaLLMConfig(vocab_size=len(tokenizer), **config["untrained_model"]))
    summary = {"model": config.get("model") or f"untrained {config['untrained_model']}", "samples": config["samples"],
               "max_atoms": config["max_atoms"]}
    arms = {"grammar_and_floor": {}, "grammar": {"min_distance": 0.0}, "no_grammar": {"grammar": False}}
    for name, arm in arms.items():
        start = time.perf_counter()
        settings = SamplingSettings(max_atoms=config["max_atoms"], batch_size=config["batch_size"],
                                    seed=config.get("seed", 0), bf16=False, **arm)
        samples = list(generate_structures(model, tokenizer, num=config["samples"], settings=settings))
        seconds = time.perf_counter() - start
        failures = [sample.error for sample in samples if sample.error]
        valid = [s for s in samples if s.structure is not None and structural_validity(s.structure)]
        summary[name] = {
            "parse_rate": 1 - len(failures) / len(samples), "structural_validity": len(valid) / len(samples),
            "resampled": sum(1 for s in samples if s.resamples), "below_floor": sum(1 for s in samples if s.fallbacks),
            "seconds": seconds, "samples_per_second": len(samples) / seconds, "first_failures": failures[:5]}
        print(json.dumps(summary, indent=1), flush=True)
    (Path(config["output_dir"]) / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
