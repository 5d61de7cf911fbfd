"""Stage: fit the surrogate predictor of one property (crystallm/properties/surrogates.py) on the pretraining corpus
rows that have it, and measure its MAE on a test split it never saw.

    python train/surrogate.py configs/surrogate-band_gap.yaml

Writes `<output_dir>/predictor.skops` (no pickle) and `report.json` (validation MAE of each candidate, the chosen one,
held-out MAE, and the MAE of always predicting the training mean, for scale).
"""

import json

import numpy as np

from crystallm.data import PROPERTY_UNITS, labelled_texts
from crystallm.generation.sampling import load_generator
from crystallm.properties.surrogates import fit_surrogate, save_surrogate
from crystallm.stage_config import read_stage_config


def main() -> None:
    config = read_stage_config(__doc__)
    name = config["property"]
    model, tokenizer = load_generator(config.get("model"))
    texts, values = labelled_texts(config["corpus"], name)
    predictor = fit_surrogate(model, tokenizer, name, texts, values, seed=config.get("seed", 0))
    test_texts, test_values = labelled_texts(config["test"], name, tuple(config["test_sources"]))
    predicted = predictor.predict(model, tokenizer, test_texts)
    report = {"property": name, "unit": PROPERTY_UNITS[name], "training_rows": len(texts),
              "validation_mae": predictor.validation_mae, "chosen": type(predictor.regressor).__name__,
              "held_out": {"sources": config["test_sources"], "rows": len(test_texts),
                           "mae": float(np.mean(np.abs(predicted - test_values))),
                           "mae_of_training_mean": float(np.mean(np.abs(values.mean() - test_values)))}}
    save_surrogate(predictor, report, config["output_dir"])
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
