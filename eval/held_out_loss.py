"""Stage: the held-out losses of saved models on test texts they never trained on (issue 34): the mean causal-LM
loss on a seeded sample of each test source's texts (`data.sample_texts`, the same sample pretraining logs).

    python eval/held_out_loss.py configs/experiments/eval-held-out-loss.yaml
"""

import json
from pathlib import Path

from crystallm import data
from crystallm.generation.sampling import load_generator
from crystallm.stage_config import read_stage_config
from crystallm.training.collator import PretrainingCollator
from crystallm.training.pretrain import evaluate_losses, make_accelerator
from crystallm.training.settings import TrainingSettings


def main() -> None:
    config = read_stage_config(__doc__)
    accelerator = make_accelerator(TrainingSettings(output_dir=config["output_dir"], mixed_precision="no"))
    texts = {name: data.sample_texts(config.get("test_file", "data/test-sets.csv.gz"), source,
                                     int(config.get("test_rows", 2000)), int(config.get("seed", 0)))
             for name, source in config["test_sets"].items()}
    summary = {"test_sets": config["test_sets"], "test_rows": config.get("test_rows", 2000), "models": {}}
    for label, folder in config["models"].items():
        model, tokenizer = load_generator(folder, device="cpu")
        collator = PretrainingCollator(tokenizer, max_length=model.config.n_positions, masked_atom=False,
                                       contrastive=False)
        summary["models"][label] = {name: evaluate_losses(accelerator, model, collator, rows, 32)["eval_loss"]
                                    for name, rows in texts.items()}
        print(label, summary["models"][label], flush=True)
    (Path(config["output_dir"]) / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
