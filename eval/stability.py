"""Stage: the stability protocol (docs/architecture.md) on a collection: CHGNet relaxation of every structurally
valid structure, E_hull against the approximate hull, RMSD and S.U.N. (crystallm/evaluation/relaxation.py).

    python eval/stability.py configs/experiments/eval-stability-mp20bt-test500.yaml

Resumable: relaxation results go to `<output_dir>/stability.jsonl` (or `cache`) as they come. Writes `summary.json` and
`summary.md`; with `known_column`, also the agreement of E_hull with that column of the input split.
"""

from pathlib import Path

from crystallm import data
from crystallm.evaluation import EvaluationOptions, StabilityTask, batch, metrics, reports
from crystallm.evaluation.relaxation import ReferenceHull, RelaxationSettings, e_hull_agreement, place_on_hull
from crystallm.stage_config import read_stage_config


def main() -> None:
    config = read_stage_config(__doc__)
    out = Path(config["output_dir"])
    ids = data.read_ids(config["ids"])[: config.get("count")] if config.get("ids") else None
    settings = RelaxationSettings(**config.get("relaxation", {}))
    options = EvaluationOptions(ids=tuple(ids) if ids else None, limit=config.get("limit"),
                                num_proc=config.get("num_proc"), ray=config.get("ray"))
    cache = Path(config.get("cache", out / "stability.jsonl"))  # another run's cache: nothing relaxed twice
    summary = batch.evaluate(config["input"], reference=config.get("reference"),
                             stability=StabilityTask(settings, cache), options=options)
    if config.get("known_column"):
        benchmark, _, split = config["input"].partition("/")
        dataset = data.load_split(benchmark, split)
        known = dict(zip(dataset["id"], dataset[config["known_column"]]))
        hull = ReferenceHull.from_file()
        cached = reports.read_json_lines(cache)
        placed = [place_on_hull(record, hull, settings.mp2020) for record in cached]
        summary["stability"]["agreement_with_" + config["known_column"]] = e_hull_agreement(placed, known)
    reports.write_json(summary, out / "summary.json")
    metrics.write_markdown(summary, out / "summary.md")
    print(metrics.markdown_table(summary))


if __name__ == "__main__":
    main()
