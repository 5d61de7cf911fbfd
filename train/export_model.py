"""Stage: copy a trained model's files into a model folder (the shipped default lives in
crystallm/resources/default-model), with the corpus it was trained on, and write its model card from the run's records.

    python train/export_model.py configs/export-default-model.yaml
"""

import json
import shutil
from pathlib import Path

from crystallm.model_card import MODEL_FILES, render_model_card, training_record
from crystallm.model_folder import TRAINING_CORPUS
from crystallm.stage_config import read_stage_config


def main() -> None:
    config = read_stage_config(__doc__)
    run, destination = Path(config["run_dir"]), Path(config["destination"])
    destination.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        shutil.copyfile(run / name, destination / name)
    # What the model was trained on travels with it: the novelty reference of `crystallm design`.
    shutil.copyfile(config["corpus"], destination / TRAINING_CORPUS)
    results = {label: json.loads(Path(path).read_text()) for label, path in (config.get("results") or {}).items()
               if Path(path).exists()}
    card = render_model_card(config["title"], config["description"], training_record(run), config["command"],
                             Path(config["config"]).read_text(), config["hardware"], results, config.get("notes", ""))
    (destination / "README.md").write_text(card)
    print(f"wrote {destination} ({sum(f.stat().st_size for f in destination.iterdir()) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
