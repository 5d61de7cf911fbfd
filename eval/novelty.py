"""Stage: novelty against a large reference (the 31k-structure pretraining corpus), exact and with the embedding
k-NN pre-filter, on the same scored collection: seconds for each, structures/s of the whole `evaluate`, and a
check that both flag exactly the same structures as novel.

    python eval/novelty.py configs/experiments/eval-novelty-corpus.yaml

The exact path matches each structure against every reference entry of its reduced formula, which is what
exhaustive matching does (StructureMatcher never matches two formulas). Embeds the reference first (`crystallm
embed`) if its embeddings file is missing.
"""

import time
from pathlib import Path

from crystallm.evaluation import reports
from crystallm.evaluation.batch import EvaluationOptions, evaluate
from crystallm.evaluation.metrics import MetricInputs
from crystallm.evaluation.readers import iter_entries
from crystallm.evaluation.reference import ReferenceSet
from crystallm.evaluation.scoring import score_entries
from crystallm.properties.embedding import embed_entries, knn_reference
from crystallm.stage_config import read_stage_config


def main() -> None:
    config = read_stage_config(__doc__)
    out = Path(config["output_dir"])
    embeddings_file = Path(config["reference_embeddings"])
    summary = {key: config[key] for key in ("input", "reference", "neighbours")}
    if not embeddings_file.exists():
        started = time.perf_counter()
        embeddings_file.parent.mkdir(parents=True, exist_ok=True)
        embed_entries(list(iter_entries(config["reference"])), source=config["reference"]).save(embeddings_file)
        summary["embedding_seconds"] = time.perf_counter() - started

    records = list(score_entries(iter_entries(config["input"]), num_proc=config.get("num_proc")))
    unique = MetricInputs(records).unique  # novelty is measured on the unique valid records
    # Untimed warm-up, so neither mode pays the process's one-time costs (imports, first reads); the end-to-end
    # `evaluate` figure below is the user's cost.
    ReferenceSet.from_collection(config["reference"]).novel_mask([r.structure for r in records[:20] if r.structure])
    flags = {}
    for mode, neighbours in (("exact", None), ("knn", int(config["neighbours"]))):
        started = time.perf_counter()
        reference = (knn_reference(config["reference"], embeddings_file) if neighbours
                     else ReferenceSet.from_collection(config["reference"]))
        inputs = MetricInputs(records, reference=reference, neighbours=neighbours)
        inputs.unique = unique  # matched once above; this times the novelty alone
        flags[mode] = inputs.novel
        summary[f"{mode}_novelty"] = sum(flags[mode].values()) / len(flags[mode]) if flags[mode] else None
        summary[f"{mode}_seconds"] = time.perf_counter() - started
    summary["same_flags"] = flags["exact"] == flags["knn"]
    summary["structures_checked"] = len(flags["exact"])

    started = time.perf_counter()  # what a user's `crystallm evaluate --reference-embeddings` costs end to end
    result = evaluate(config["input"], reference=knn_reference(config["reference"], embeddings_file),
                      options=EvaluationOptions(num_proc=config.get("num_proc"), progress=False,
                                                neighbours=int(config["neighbours"])))
    summary["evaluate_seconds"] = time.perf_counter() - started
    summary["evaluate_structures_per_second"] = result["entries"] / summary["evaluate_seconds"]
    summary["evaluate_novelty"] = result["novelty"]
    reports.write_json(summary, out / "summary.json")
    print(summary)


if __name__ == "__main__":
    main()
