"""Plots of a scored collection against a reference: space groups, density, element counts, validity."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from crystallm.evaluation.scoring import ScoredStructure


def write_plots(records: list[ScoredStructure], reference: list[ScoredStructure] | None,
                directory: str | Path) -> list[Path]:
    """Space-group histogram, density and element-count distributions vs reference, validity breakdown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    scored = [r for r in records if not r.error]
    written = []

    def save(figure, name):
        path = directory / name
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)

    figure, axis = plt.subplots(figsize=(9, 3.2))
    groups = [r.space_group_0_1 or 1 for r in scored]
    axis.hist(groups, bins=np.arange(0.5, 231.5, 1.0), color="tab:blue", label="evaluated")
    if reference:
        axis.hist([r.space_group_0_1 or 1 for r in reference], bins=np.arange(0.5, 231.5, 1.0),
                  histtype="step", color="black", density=False,
                  weights=np.full(len(reference), len(scored) / max(1, len(reference))), label="reference (scaled)")
    axis.set(xlabel="space group number (spglib, symprec 0.1)", ylabel="structures", xlim=(0, 231))
    axis.legend()
    save(figure, "space_groups.png")

    for key, label, name in (("density", "density (g/cm$^3$)", "density.png"),
                             ("n_elements", "number of elements", "num_elements.png")):
        figure, axis = plt.subplots(figsize=(5, 3.2))
        values = [getattr(r, key) for r in scored if np.isfinite(getattr(r, key))]
        bins = np.arange(0.5, 9.5, 1.0) if key == "n_elements" else 40
        axis.hist(values, bins=bins, density=True, alpha=0.6, label="evaluated")
        if reference:
            axis.hist([getattr(r, key) for r in reference], bins=bins, density=True, histtype="step", color="black",
                      label="reference")
        axis.set(xlabel=label, ylabel="share")
        axis.legend()
        save(figure, name)

    figure, axis = plt.subplots(figsize=(5, 3.2))
    counts = {"unreadable": len(records) - len(scored),
              "structurally invalid": sum(not r.structural_valid for r in scored),
              "compositionally invalid": sum(r.structural_valid and not r.compositional_valid for r in scored),
              "valid": sum(r.valid for r in scored)}
    axis.barh(list(counts), list(counts.values()), color=["grey", "tab:red", "tab:orange", "tab:green"])
    axis.set(xlabel="entries")
    save(figure, "validity.png")
    return written
