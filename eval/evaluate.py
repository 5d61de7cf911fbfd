"""Stage: one benchmark protocol of DESIGN.md section 5 (de novo or CSP), from a YAML config.

    python eval/evaluate.py configs/eval-mp20bt-test-self.yaml

Writes `<output_dir>/summary.json`, `summary.md`, `records.jsonl` (one line per structure) and `plots/*.png`.
"""

from pathlib import Path

from crystallm.evaluation import batch, reports
from crystallm.stage_config import read_stage_config


def main() -> None:
    config = read_stage_config(__doc__)
    out = Path(config.pop("output_dir"))
    summary = batch.evaluate(config.pop("input"), plots=out / "plots", records_path=out / "records.jsonl",
                                  **config)
    reports.write_json(summary, out / "summary.json")
    reports.write_markdown(summary, out / "summary.md")
    print(reports.markdown_table(summary))


if __name__ == "__main__":
    main()
