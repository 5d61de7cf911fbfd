"""Stage: write MP's own hull (../shared/data/mp_hull, CC BY-NC) as a hull file, outside the package, for
`--hull FILE` and the stability error-rate stage (eval/stability_error_rate.py, which also measures the shipped
hull's bias against it).

    python eval/mp_hull.py configs/experiments/mp-hull.yaml
"""

from pathlib import Path

from crystallm.evaluation.hull import ReferenceHull
from crystallm.stage_config import read_stage_config


def main() -> None:
    config = read_stage_config(__doc__)
    output = Path(config["output"])
    output.parent.mkdir(parents=True, exist_ok=True)
    hull = ReferenceHull.from_mp_summary()
    hull.to_file(output)
    print(f"wrote {output}: {len(hull.formation_energies)} MP hull materials with MP2020-corrected formation "
          f"energies, {len(hull.elemental_energies)} elemental references")


if __name__ == "__main__":
    main()
