"""Stage: what each pretraining objective costs (issue 20). Trains each arm of the config for `steps` steps on the
same batches (`train/pretrain.py`'s loop, from scratch, into a scratch folder) and reads its `log.jsonl`:
mean seconds a step and causal-LM tokens a second, after the first `warmup` steps.

    python eval/objective_cost.py configs/experiments/eval-objective-cost.yaml

`pretrain` holds the settings shared by every arm (a configs/pretrain-*.yaml body); each arm adds its `model`
weights and `auxiliary_every`. Writes `<output_dir>/summary.json` and `summary.md`.
"""

import json
import tempfile
from pathlib import Path

import numpy as np

from crystallm.evaluation import reports
from crystallm.stage_config import read_stage_config
from crystallm.training.pretrain import pretrain
from crystallm.training.settings import PretrainingSettings


def main() -> None:
    config = read_stage_config(__doc__)
    steps, warmup = int(config["steps"]), int(config["warmup"])
    results = {}
    for name, arm in config["arms"].items():
        with tempfile.TemporaryDirectory() as scratch:
            settings = {**config["pretrain"], "output_dir": scratch, "max_steps": steps, "save_every": steps,
                        "eval_every": steps + 1, "auxiliary_every": arm.get("auxiliary_every", 1),
                        "model": {**config["pretrain"]["model"], **arm["model"]}}
            out = pretrain(PretrainingSettings.from_dict(settings))
            log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        timed = [row for row in log if "train_seconds" in row and row["step"] > warmup]
        seconds = np.diff([row["train_seconds"] for row in timed])
        tokens = np.diff([row["tokens_seen"] for row in timed])
        results[name] = {"seconds_per_step": float(seconds.mean()),
                         "clm_tokens_per_s": float(tokens.sum() / seconds.sum()),
                         "auxiliary_every": arm.get("auxiliary_every", 1)}
        print(name, results[name], flush=True)
    base = results[next(iter(results))]["seconds_per_step"]
    for result in results.values():
        result["step_cost_ratio"] = result["seconds_per_step"] / base
    reports.write_json({"steps": steps, "warmup": warmup, "results": results},
                       Path(config["output_dir"]) / "summary.json")
    lines = ["| arm | auxiliary every | s/step | x CLM only | CLM tokens/s |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {r['auxiliary_every']} | {r['seconds_per_step']:.3f} | {r['step_cost_ratio']:.2f} | "
              f"{r['clm_tokens_per_s']:,.0f} |" for name, r in results.items()]
    (Path(config["output_dir"]) / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
