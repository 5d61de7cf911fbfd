"""Stage: held-out denoising of the refinement head (crystallm/refinement/): real test structures
noised at known levels (as in training, written as text), refined from that level, their error before and after;
a curve over the noise level, as numbers and a plot. With `skeleton_pairs: {seed:, within:}`, also the model's own
error on the same structures (issue 38): its numbers sampled on each one's skeleton
(`generation.skeleton.skeleton_pairs`), refined by the head; before and after over all pairs and over those whose
sites sit within `within` Å of the truth.

    python eval/denoising.py configs/experiments/eval-denoising-default.yaml
"""

from dataclasses import asdict
from pathlib import Path

from crystallm import data
from crystallm.evaluation import reports
from crystallm.generation.sampling import load_generator
from crystallm.generation.skeleton import skeleton_pairs
from crystallm.io import text_format
from crystallm.refinement import denoising_errors, pair_errors
from crystallm.stage_config import read_stage_config


def plot(errors: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sigmas = [e["sigma"] for e in errors]
    figure, (atoms, cells) = plt.subplots(1, 2, figsize=(9, 3.6))
    atoms.plot(sigmas, [e["rmsd_before"] for e in errors], "o-", label="noised (before)")
    atoms.plot(sigmas, [e["rmsd_after"] for e in errors], "s-", label="refined (after)")
    atoms.set(xscale="log", yscale="log", xlabel="noise level sigma (Å)", ylabel="median RMSD to clean (Å)")
    cells.plot(sigmas, [e["length_error_before"] for e in errors], "o-", label="noised (before)")
    cells.plot(sigmas, [e["length_error_after"] for e in errors], "s-", label="refined (after)")
    cells.set(xscale="log", yscale="log", xlabel="noise level sigma (Å)", ylabel="mean relative cell-length error")
    atoms.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    config = read_stage_config(__doc__)
    out = Path(config["output_dir"])
    wanted = data.read_ids(config["ids"])[: int(config["count"])]
    texts = data.load_texts(config["texts"])
    by_id = {i: t for i, t, s in zip(texts["id"], texts["text"], texts["source"]) if s == config["source"]}
    crystals = [text_format.read_crystal_text(by_id[i]) for i in wanted if i in by_id]
    model, tokenizer = load_generator(config.get("model"))
    errors = [asdict(e) for e in denoising_errors(model, tokenizer, crystals, config["sigmas"], seed=config["seed"])]
    summary = {"model": config.get("model"), "structures": len(crystals), "source": config["source"],
               "errors": errors}
    if config.get("skeleton_pairs"):
        seed, within = config["skeleton_pairs"]["seed"], config["skeleton_pairs"]["within"]
        pairs = [(text_format.read_crystal_text(sampled), text_format.read_crystal_text(true)) for true, sampled
                 in skeleton_pairs(model, tokenizer, [by_id[i] for i in wanted if i in by_id], seed)]
        summary["skeleton_pairs"] = {"pairs": len(pairs), "all": asdict(pair_errors(model, tokenizer, pairs)),
                                     f"within {within} Å": asdict(pair_errors(model, tokenizer, pairs, within=within))}
        for name, e in summary["skeleton_pairs"].items():
            if name != "pairs":
                print(f"skeleton pairs, {name}: RMSD {e['rmsd_before']:.4f} -> {e['rmsd_after']:.4f} Å, "
                      f"cell lengths {e['length_error_before']:.4f} -> {e['length_error_after']:.4f}")
    reports.write_json(summary, out / "summary.json")
    plot(errors, out / "denoising.png")
    for e in errors:
        print(f"sigma {e['sigma']:.3f}: RMSD {e['rmsd_before']:.4f} -> {e['rmsd_after']:.4f} Å, "
              f"cell lengths {e['length_error_before']:.4f} -> {e['length_error_after']:.4f}")


if __name__ == "__main__":
    main()
