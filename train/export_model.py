"""Stage: copy a trained model's files into a model folder (the shipped default lives in
crystallm/resources/default-model), with the corpus it was trained on, and write its model card from the run's records.

    python train/export_model.py configs/export-default-model.yaml
"""

import filecmp
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
    # What the model was trained on travels with it: the novelty reference of `crystallm design`.
    copies = [(run / name, destination / name) for name in MODEL_FILES] + [(Path(config["corpus"]),
                                                                           destination / TRAINING_CORPUS)]
    for source, target in copies:
        # A file already the same stays in place: rewriting weights under a process that reads them (safetensors
        # maps the file) crashes it.
        if not target.exists() or not filecmp.cmp(source, target, shallow=False):
            shutil.copyfile(source, target)
    results = {label: json.loads(Path(path).read_text()) for label, path in (config.get("results") or {}).items()
               if Path(path).exists()}
    card = render_model_card(config["title"], config["description"], training_record(run), config["command"],
                             Path(config["config"]).read_text(), config["hardware"], results, config.get("notes", ""))
    (destination / "README.md").write_text(card)
    print(f"wrote {destination} ({sum(f.stat().st_size for f in destination.iterdir()) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
