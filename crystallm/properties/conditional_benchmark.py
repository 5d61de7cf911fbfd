"""The conditional benchmark (docs/architecture.md, Conditional): for each target of one property, samples from
the property's adapter without and with classifier-free guidance, and from the unconditioned base model, checked
by the property's surrogate predictor (its held-out MAE reported beside every row).

A row's `within_tolerance` is the share of *valid* samples (structural and compositional) whose predicted value
lies within `tolerance` of the target; `mean_predicted` is over the same samples. The base model's samples do not
depend on the target, so one set of them is scored against every target.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from crystallm.adapters import use_adapter
from crystallm.evaluation import reports
from crystallm.generation.prompt import Prompt
from crystallm.generation.run_folder import GenerationFolder, generate_into
from crystallm.generation.settings import SamplingSettings
from crystallm.properties.surrogates import SurrogatePredictor


def target_statistics(predicted: np.ndarray, target: float, tolerance: float) -> dict:
    """Share of predicted values within `tolerance` of `target`, their mean and count.

    >>> target_statistics(np.array([0.1, 0.4, 2.0]), 0.0, 0.5)
    {'valid_samples': 3, 'within_tolerance': 0.6666666666666666, 'mean_predicted': 0.8333333333333334}
    """
    if not len(predicted):
        return {"valid_samples": 0, "within_tolerance": None, "mean_predicted": None}
    return {"valid_samples": int(len(predicted)),
            "within_tolerance": float(np.mean(np.abs(predicted - target) <= tolerance)),
            "mean_predicted": float(np.mean(predicted))}


def surrogate_ceiling(model, tokenizer, predictor: SurrogatePredictor, texts: list[str], values: np.ndarray,
                      target: float, tolerance: float, limit: int = 300) -> dict:
    """What a perfect generator would score: of real structures whose true value lies within `tolerance` of
    `target` (at most `limit` of them), the share the surrogate also puts within it. A conditional row is
    measured by the same surrogate, so this is its ceiling.
    """
    chosen = [text for text, value in zip(texts, values) if abs(value - target) <= tolerance][:limit]
    if not chosen:
        return {"ceiling": None, "ceiling_rows": 0}
    predicted = predictor.predict(model, tokenizer, chosen)
    return {"ceiling": float(np.mean(np.abs(predicted - target) <= tolerance)), "ceiling_rows": len(chosen)}


def score_folder(folder: GenerationFolder, summary: dict, model, tokenizer, predictor: SurrogatePredictor) -> dict:
    """Validity, uniqueness and the surrogate's predictions for the valid samples of a finished folder."""
    valid_texts = [entry["text"] for entry, record in zip(folder.entries, folder.records) if record.valid]
    predicted = predictor.predict(model, tokenizer, valid_texts) if valid_texts else np.array([])
    return {"samples": summary["entries"], "validity": summary["validity"]["overall"],
            "uniqueness": summary["uniqueness"], "structures_per_second":
            summary["generation"]["structures_per_second"], "predicted": predicted}


def run_conditional_benchmark(model, tokenizer, adapter: str, predictor: SurrogatePredictor, targets: list[float],
                              tolerance: float, num: int, guidance: float, output_dir: str | Path,
                              seed: int = 0, batch_size: int = 32, progress: bool = True,
                              on_row: Callable[[dict], None] | None = None,
                              reference: tuple[list[str], np.ndarray] | None = None) -> list[dict]:
    """Generate (resumably, one `crystallm generate` folder per arm under `output_dir`) and score every arm;
    returns one row per (target, arm) with arm in `base`, `adapter`, `adapter+guidance`. `on_row` sees each
    row as soon as it is measured (the stage writes its report there, so a stopped run loses nothing).
    `reference` (texts, true values of a held-out split) adds each target's `surrogate_ceiling`.
    """
    output_dir = Path(output_dir)

    def arm(name: str, prompt: Prompt | None, guidance_scale: float) -> dict:
        sampling = SamplingSettings(seed=seed, batch_size=batch_size, guidance=guidance_scale)
        folder = GenerationFolder(output_dir / name, sampling,
                                  {"adapter": adapter, "prompt": prompt.describe() if prompt else "", "num": num},
                                  resume=True)
        summary = generate_into(folder, model, tokenizer, prompt, num=num, progress=progress)
        return score_folder(folder, summary, model, tokenizer, predictor)

    model = use_adapter(model, adapter)
    rows = []
    base = arm("base", None, 1.0)
    for target in targets:
        prompt = Prompt.of(property_name=adapter, target=target)
        ceiling = surrogate_ceiling(model, tokenizer, predictor, *reference, target, tolerance) if reference else {}
        for name, scored in [("base", base), ("adapter", arm(f"target-{target:g}", prompt, 1.0)),
                             ("adapter+guidance", arm(f"target-{target:g}-guidance-{guidance:g}", prompt, guidance))]:
            row = {"property": adapter, "target": target, "arm": name, "guidance": guidance if "guidance" in name
                   else None, "tolerance": tolerance,
                   **{key: value for key, value in scored.items() if key != "predicted"},
                   **target_statistics(scored["predicted"], target, tolerance), **ceiling}
            rows.append(row)
            if on_row:
                on_row(row)
    return rows


def markdown_rows(rows: list[dict], unit: str, surrogate_mae: float) -> str:
    """The benchmark's rows as a Markdown table."""
    lines = [f"| target ({unit}) | arm | within ±tol | mean predicted | valid | unique | n | surrogate MAE | "
             f"surrogate ceiling |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        within = "–" if row["within_tolerance"] is None else f"{row['within_tolerance']:.3f}"
        mean = "–" if row["mean_predicted"] is None else f"{row['mean_predicted']:.2f}"
        ceiling = "–" if row.get("ceiling") is None else f"{row['ceiling']:.3f} ({row['ceiling_rows']})"
        lines.append(f"| {row['target']:g} | {row['arm']} | {within} | {mean} | {row['validity']:.3f} | "
                     f"{row['uniqueness']:.3f} | {row['samples']} | {surrogate_mae:.3f} | {ceiling} |")
    return "\n".join(lines)


def write_report(rows: list[dict], directory: str | Path, unit: str, surrogate_report: dict) -> None:
    """report.json (rows and the surrogate's report) and report.md in `directory`."""
    directory = Path(directory)
    reports.write_json({"surrogate": surrogate_report, "rows": rows}, directory / "report.json")
    reports.replace_file(directory / "report.md",
                         markdown_rows(rows, unit, surrogate_report["held_out"]["mae"]).encode() + b"\n")
