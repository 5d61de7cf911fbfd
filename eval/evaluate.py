"""Stage: one benchmark protocol of docs/architecture.md (de novo or CSP), from a YAML config.

    python eval/evaluate.py configs/experiments/eval-mp20bt-test-self.yaml

Writes `<output_dir>/summary.json`, `summary.md`, `records.jsonl` (one line per structure) and `plots/*.png`.
"""

from pathlib import Path

from crystallm.evaluation import CSPTask, EvaluationOptions, batch, metrics, reports
from crystallm.stage_config import read_stage_config


def main() -> None:
    config = read_stage_config(__doc__)
    out = Path(config.pop("output_dir"))
    csp = CSPTask(config["csp"], config.get("csp_ids"), tuple(config.get("attempts", (1, 20)))) if config.get(
        "csp") else None
    options = EvaluationOptions(coverage=config.get("coverage", False), plots=out / "plots",
                                records_path=out / "records.jsonl")
    summary = batch.evaluate(config["input"], reference=config.get("reference"), test=config.get("test"), csp=csp,
                             options=options)
    reports.write_json(summary, out / "summary.json")
    metrics.write_markdown(summary, out / "summary.md")
    print(metrics.markdown_table(summary))


if __name__ == "__main__":
    main()
