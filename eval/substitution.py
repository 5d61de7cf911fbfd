"""Stage: masked-element recovery on mp20-bt test (docs/architecture.md, Substitution): a seeded sample of
(crystal, element) pairs, the element hidden everywhere the text writes it; top-1 / top-3 recovery of each model
against the element-frequency and data-mined baselines.

    python eval/substitution.py configs/experiments/eval-substitution-recovery.yaml

Writes `<output_dir>/summary.json` and `summary.md`.
"""

from pathlib import Path

from crystallm import data
from crystallm.evaluation import reports
from crystallm.evaluation.element_recovery import (
    data_mined_scores,
    frequency_scores,
    rank_of,
    recovery_tasks,
    summarize_recovery,
)
from crystallm.generation.substitution import load_substitution_model, substitution_log_probabilities
from crystallm.stage_config import read_stage_config


def main() -> None:
    config = read_stage_config(__doc__)
    out = Path(config["output_dir"])
    test = data.load_texts(config["test_texts"]).filter(lambda row: row["source"] == "mp_20_biternary/test")
    tasks = recovery_tasks(test["id"], test["text"], int(config["tasks"]), int(config["seed"]))
    frequency = frequency_scores(data.load_texts(config["corpus"])["text"])
    ranks = {"element frequency": [rank_of(t.hidden, frequency, t.others) for t in tasks],
             "data-mined (pymatgen)": [rank_of(t.hidden, data_mined_scores(t), t.others) for t in tasks]}
    for name, spec in config["models"].items():  # a model folder (None: the default), or {model:, adapter: false}
        spec = spec if isinstance(spec, dict) else {"model": spec}
        model, tokenizer = load_substitution_model(spec.get("model"), adapter=spec.get("adapter", True))
        ranks[name] = [rank_of(t.hidden, substitution_log_probabilities(model, tokenizer, t.text, t.hidden),
                               t.others) for t in tasks]
    summary = {"tasks": len(tasks), "seed": config["seed"],
               "recovery": {name: summarize_recovery(values) for name, values in ranks.items()}}
    reports.write_json(summary, out / "summary.json")
    rows = ["| ranker | top-1 | top-3 | median rank |", "|---|---|---|---|"]
    rows += [f"| {name} | {r['top1']:.3f} | {r['top3']:.3f} | {r['median_rank']:g} |"
             for name, r in summary["recovery"].items()]
    (out / "summary.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
