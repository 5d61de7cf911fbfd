"""Stage: one benchmark protocol of DESIGN.md section 5 (de novo or CSP), from a YAML config.

    python eval/evaluate.py configs/eval-mp20bt-test-self.yaml

Writes `<output_dir>/summary.json`, `<output_dir>/summary.md` and `<output_dir>/plots/*.png`.
"""

from pathlib import Path

from crystallm import evaluation, reports
from crystallm.stages import read_stage_config


def main() -> None:
    config = read_stage_config(__doc__)
    out = Path(config.pop("output_dir"))
    summary = evaluation.evaluate(config.pop("input"), plots=out / "plots", **config)
    reports.write_json(summary, out / "summary.json")
    reports.write_markdown(summary, out / "summary.md")
    print(reports.markdown_table(summary))


if __name__ == "__main__":
    main()
