"""Stage: compare pretrained models (the objectives' ablation) on what each objective is for.

    python eval/ablation.py configs/experiments/eval-ablation.yaml

On `test_rows` seeded mp20-bt test texts: (a) causal-LM loss, (b) masked-element accuracy (bidirectional pass, one
element hidden everywhere), (c) retrieval top-1 of a hard view (`text_format.hard_view`) among all those texts and
among those of its formula. (d) For each of `properties`, the held-out MAE of the surrogate fitted on the model's
embeddings as `train/surrogate.py` fits it (corpus rows with the property; all of mp20-bt test).
Writes `<output_dir>/summary.json` and `summary.md`. A model measured before (the same name and the same weights,
by their SHA-256, in the summary already there) is not measured again; nor is one measured before whose folder
has gone (runs/ of an earlier session): its result is kept.
"""

import hashlib
import json
import random
from pathlib import Path

import numpy as np

from crystallm import data
from crystallm.modeling import load_model
from crystallm.properties.surrogates import embed, select_regressor
from crystallm.stage_config import read_stage_config
from crystallm.tokenization import CrystaLLMTokenizer
from crystallm.training import probes
from crystallm.training.collator import PretrainingCollator

TEST_SOURCE = "mp_20_biternary/test"


def surrogate_maes(model, tokenizer, labelled: dict, seed: int) -> dict[str, float]:
    """Held-out MAE of each property's surrogate on this model's embeddings; each text embedded once."""
    texts = list(dict.fromkeys(t for train, test in labelled.values() for t in train[0] + test[0]))
    features = dict(zip(texts, embed(model, tokenizer, texts)))
    maes = {}
    for name, ((train_texts, train_values), (test_texts, test_values)) in labelled.items():
        regressor, _ = select_regressor(np.stack([features[t] for t in train_texts]), train_values, seed)
        predicted = regressor.predict(np.stack([features[t] for t in test_texts]))
        maes[f"surrogate_mae_{name}"] = float(np.mean(np.abs(predicted - test_values)))
    return maes


def weights_digest(path: str) -> str:
    """SHA-256 of a model folder's weights: a model retrained in the same folder is measured again."""
    return hashlib.sha256((Path(path) / "model.safetensors").read_bytes()).hexdigest()


def main() -> None:
    config = read_stage_config(__doc__)
    seed = config.get("seed", 0)
    tokenizer = CrystaLLMTokenizer.from_format()
    collator = PretrainingCollator(tokenizer, seed=seed)
    test = data.load_texts(config["test_texts"])
    test_texts = [t for s, t in zip(test["source"], test["text"]) if s == TEST_SOURCE]
    test_texts = random.Random(seed).sample(test_texts, min(int(config["test_rows"]), len(test_texts)))
    labelled = {name: (data.labelled_texts(config["corpus"], name),
                       data.labelled_texts(config["test_texts"], name, (TEST_SOURCE,)))
                for name in config["properties"]}
    out = Path(config["output_dir"])
    before = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    results, digests, texts_in_groups = {}, {}, before.get("texts_in_formula_groups")
    for name, path in config["models"].items():
        gone = not (Path(path) / "model.safetensors").exists()  # a run of an earlier session, measured then
        digests[name] = before.get("weights", {}).get(name) if gone else weights_digest(path)
        if before.get("weights", {}).get(name) == digests[name] and name in before.get("results", {}):
            results[name] = before["results"][name]
            print(name, "measured before:", json.dumps(results[name]), flush=True)
            continue
        model = load_model(path).eval()
        retrieval = probes.retrieval(model, collator, test_texts, seed=seed)
        texts_in_groups = retrieval.texts_in_groups
        results[name] = {
            "heldout_clm_loss": probes.causal_lm_loss(model, collator, test_texts),
            "masked_atom_accuracy": probes.masked_atom_accuracy(model, collator, test_texts),
            "retrieval_top1": retrieval.top1,
            "retrieval_top1_within_formula": retrieval.top1_within_formula,
            **surrogate_maes(model, tokenizer, labelled, seed),
        }
        print(name, json.dumps(results[name]), flush=True)
    summary = {"models": config["models"], "weights": digests, "test_rows": len(test_texts),
               "texts_in_formula_groups": texts_in_groups,
               "surrogate_rows": {name: {"train": len(train[0]), "test": len(test[0])}
                                  for name, (train, test) in labelled.items()},
               "results": results}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    keys = list(next(iter(results.values())))
    lines = ["| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{r[k]:.4f}" for k in keys) + " |" for name, r in results.items()]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
