"""Stage: the conditional benchmark of one property adapter (crystallm/conditional_benchmark.py).

    python eval/conditional.py configs/experiments/eval-conditional-band_gap.yaml

Generation goes to one resumable folder per arm under `output_dir`; `report.json` and `report.md` there are
rewritten after every measured row. With `ceiling_texts`, each target also gets the surrogate's ceiling: the
share of real held-out structures with that property value that the surrogate itself puts within tolerance.
"""

from crystallm.data import PROPERTY_UNITS, labelled_texts
from crystallm.generation.sampling import load_generator
from crystallm.properties.conditional_benchmark import run_conditional_benchmark, write_report
from crystallm.properties.surrogates import load_surrogate
from crystallm.stage_config import read_stage_config


def main() -> None:
    config = read_stage_config(__doc__)
    name = config["adapter"]
    predictor, surrogate_report = load_surrogate(config["surrogate"])
    model, tokenizer = load_generator(config.get("model"))
    rows: list[dict] = []

    def record(row: dict) -> None:
        rows.append(row)
        write_report(rows, config["output_dir"], PROPERTY_UNITS[name], surrogate_report)

    reference = labelled_texts(config["ceiling_texts"], name, tuple(config["ceiling_sources"])) \
        if config.get("ceiling_texts") else None
    run_conditional_benchmark(model, tokenizer, name, predictor, [float(t) for t in config["targets"]],
                              float(config["tolerance"]), int(config["num"]), float(config["guidance"]),
                              config["output_dir"], seed=int(config.get("seed", 0)),
                              batch_size=int(config.get("batch_size", 32)), on_row=record, reference=reference)
    print(f"{config['output_dir']}/report.md")


if __name__ == "__main__":
    main()
