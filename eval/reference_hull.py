"""Stage: write the approximate hull the package ships (crystallm/resources/reference-hull.json.gz) from the
formation energies and elemental references in ../shared/data.

    python eval/reference_hull.py configs/reference-hull.yaml
"""

from crystallm.evaluation.hull import ReferenceHull
from crystallm.stage_config import read_stage_config


def main() -> None:
    config = read_stage_config(__doc__)
    hull = ReferenceHull.from_shared_data()  # the formation energies of HULL_SOURCES
    hull.to_file(config["output"])
    print(f"wrote {config['output']}: {len(hull.formation_energies)} formation energies, "
          f"{len(hull.elemental_energies)} elemental references")


if __name__ == "__main__":
    main()
