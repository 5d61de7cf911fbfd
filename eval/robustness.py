"""Stage: evaluate a zip of real CIFs with bad entries mixed in, to the end, and report peak memory.

    python eval/robustness.py configs/experiments/eval-robustness.yaml

The zip holds `size` entries: real CIFs of mp20-bt (test, then train) and, every `bad_every`-th entry, one of:
garbage bytes, an empty file, a non-CIF text, a structure with overlapping atoms, a CIF with NaN coordinates.
Writes `<output_dir>/summary.json` with the unreadable reasons, timings and peak RSS.
"""

import itertools
import resource
import zipfile
from pathlib import Path

from crystallm import data
from crystallm.evaluation import EvaluationOptions, batch, metrics, reports
from crystallm.io.cif import structure_from_cif
from crystallm.stage_config import read_stage_config


def bad_entries(cif: str):
    """The kinds of bad entry, made from one real CIF."""
    overlapping = structure_from_cif(cif)
    overlapping.append(overlapping[0].specie, overlapping[0].frac_coords + 0.01)
    first_coordinate = cif.split("_atom_site_occupancy")[1].split()[3]
    return [("garbage.cif", b"\x00\x9f\x12 not a crystal \xff"), ("empty.cif", b""),
            ("notes.txt", b"Dear reviewer, please find the structures attached."),
            ("overlapping.cif", overlapping.to(fmt="cif").encode()),
            ("nan.cif", cif.replace(f" {first_coordinate} ", " nan ", 1).encode())]


def main() -> None:
    config = read_stage_config(__doc__)
    out = Path(config["output_dir"])
    cifs = itertools.chain(data.load_split("mp20-bt", "test")["cif"], data.load_split("mp20-bt", "train")["cif"])
    path = out / "messy.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for index, cif in enumerate(itertools.islice(cifs, config["size"])):
            if index % config["bad_every"] == 0:
                name, payload = bad_entries(cif)[(index // config["bad_every"]) % 5]
                archive.writestr(f"{index:05d}_{name}", payload)
            else:
                archive.writestr(f"{index:05d}.cif", cif)
    summary = batch.evaluate(path, options=EvaluationOptions(num_proc=config.get("num_proc"), progress=False))
    summary["peak_rss_mib"] = {
        "main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "largest_worker": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }
    reports.write_json(summary, out / "summary.json")
    print(metrics.markdown_table(summary))
    print(summary["unreadable_reasons"], summary["peak_rss_mib"])


if __name__ == "__main__":
    main()
