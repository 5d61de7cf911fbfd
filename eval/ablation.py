"""Stage: compare pretrained models (the objectives' ablation) on four measures.

    python eval/ablation.py configs/eval-ablation.yaml

(a) causal-LM loss on mp20-bt test texts, (b) masked-element accuracy (bidirectional pass, one element hidden
everywhere) on them, (c) retrieval top-1 of a hard view (`text_format.hard_view`) among all the test texts and among those of
its formula, (d) MAE of a linear probe of formation energy from
pooled embeddings, fitted on mp20-bt train rows of the pretraining corpus and scored on mp20-bt test.
Writes `<output_dir>/summary.json` and `summary.md`.
"""

import json
import random
from pathlib import Path

import numpy as np

from crystallm import data
from crystallm.modeling import load_model
from crystallm.stage_config import read_stage_config
from crystallm.tokenization import CrystaLLMTokenizer
from crystallm.training import probes
from crystallm.training.collator import PretrainingCollator


def _with_targets(texts_dataset, source: str, prop: str, limit: int, seed: int):
    values = dict(zip(*[data.load_source(source)[c] for c in ("id", prop)]))
    rows = [(t, values[i]) for i, s, t in zip(texts_dataset["id"], texts_dataset["source"], texts_dataset["text"])
            if s == source and values.get(i) is not None]
    rows = random.Random(seed).sample(rows, min(limit, len(rows)))
    return [t for t, _ in rows], np.array([v for _, v in rows], dtype=float)


def main() -> None:
    config = read_stage_config(__doc__)
    seed = config.get("seed", 0)
    tokenizer = CrystaLLMTokenizer.from_format()
    collator = PretrainingCollator(tokenizer, seed=seed)
    train_texts, train_y = _with_targets(data.load_texts(config["corpus"]), "mp_20_biternary/val",
                                         config["property"], config["train_rows"], seed)
    test_texts, test_y = _with_targets(data.load_texts(config["test_texts"]), "mp_20_biternary/test",
                                       config["property"], config["test_rows"], seed)
    results = {}
    for name, path in config["models"].items():
        model = load_model(path).eval()
        retrieval = probes.retrieval(model, collator, test_texts, seed=seed)
        results[name] = {
            "heldout_clm_loss": probes.causal_lm_loss(model, collator, test_texts),
            "masked_atom_accuracy": probes.masked_atom_accuracy(model, collator, test_texts),
            "retrieval_top1": retrieval.top1,
            "retrieval_top1_within_formula": retrieval.top1_within_formula,
            f"linear_probe_mae_{config['property']}": probes.linear_probe_mae(model, collator, train_texts, train_y,
                                                                               test_texts, test_y),
        }
        print(name, json.dumps(results[name]), flush=True)
    summary = {"models": config["models"], "train_rows": len(train_texts), "test_rows": len(test_texts),
               "texts_in_formula_groups": retrieval.texts_in_groups,
               "property": config["property"], "results": results}
    out = Path(config["output_dir"])
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    keys = list(next(iter(results.values())))
    lines = ["| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{r[k]:.4f}" for k in keys) + " |" for name, r in results.items()]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
