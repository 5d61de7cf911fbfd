"""Stage: substitution as a discovery tool (issue 20). For `count` seeded (crystal, element) pairs of mp20-bt test, the
model's best charge-neutral substitution (`rank_substitutions`, top 1, by its masked-atom adapter where it has one)
is written as a CIF, then the collection goes through the stability protocol (CHGNet relaxation, E_hull on the
approximate hull) with novelty against the pretraining corpus: its stable, novel and S.U.N. shares, to set beside de
novo samples scored the same way (configs/experiments/eval-stability-floor-200.yaml).

    python eval/substitution_discovery.py configs/experiments/eval-substitution-discovery.yaml

Writes `<output_dir>/candidates/` (one CIF per pair), `candidates.csv`, `stability.jsonl` (resumable),
`summary.json` and `summary.md`.
"""

from pathlib import Path

from crystallm import data
from crystallm.evaluation import EvaluationOptions, StabilityTask, batch, metrics, reports
from crystallm.evaluation.element_recovery import recovery_tasks
from crystallm.evaluation.relaxation import RelaxationSettings
from crystallm.generation.substitution import load_substitution_model, rank_substitutions
from crystallm.io import cif
from crystallm.stage_config import read_stage_config


def main() -> None:
    config = read_stage_config(__doc__)
    out = Path(config["output_dir"])
    folder = out / "candidates"
    folder.mkdir(parents=True, exist_ok=True)
    test = data.load_texts(config["test_texts"]).filter(lambda row: row["source"] == "mp_20_biternary/test")
    tasks = recovery_tasks(test["id"], test["text"], int(config["count"]), int(config["seed"]))
    model, tokenizer = load_substitution_model(config.get("model"))  # with its masked-atom adapter where it has one
    rows = []
    for number, task in enumerate(tasks):
        best = rank_substitutions(model, tokenizer, task.text, element=task.hidden, top=1, charge_neutral=True)
        if not best:  # no element keeps this formula neutral: the pair gives no candidate
            continue
        name = f"{number:03d}-{best[0].formula}.cif"
        (folder / name).write_text(cif.structure_to_cif(best[0].structure))
        rows.append({"cif": name, "source": task.name, "replaced": task.hidden, "element": best[0].element,
                     "formula": best[0].formula, "log_probability": round(best[0].log_probability, 4)})
    reports.write_csv(rows, out / "candidates.csv")
    stability = StabilityTask(RelaxationSettings(**config.get("relaxation", {})), out / "stability.jsonl")
    summary = batch.evaluate(folder, reference=config["reference"], stability=stability,
                             options=EvaluationOptions(num_proc=config.get("num_proc")))
    summary["pairs"], summary["model"] = len(tasks), config.get("model") or "default"
    reports.write_json(summary, out / "summary.json")
    metrics.write_markdown(summary, out / "summary.md")
    print(metrics.markdown_table(summary))


if __name__ == "__main__":
    main()
