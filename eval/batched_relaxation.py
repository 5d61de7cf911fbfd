"""Stage: batched relaxation (torch-sim, many structures in one model call) against today's one-structure-at-a-time
ASE loop, with SevenNet on the same structures (torch-sim has no CHGNet model): seconds and the final energies.

    crystallm generate --num 32 --seed 0 --out results/batched-relaxation/generated --quiet
    python eval/batched_relaxation.py configs/experiments/eval-batched-relaxation.yaml

`input` is any collection (the generated samples above are what a S.U.N. figure relaxes; known materials are
already at their minimum and take no steps).

Both use FIRE on positions and cell (ASE's FrechetCellFilter; torch-sim's `frechet_cell_fire`, ASE's flavour), the
same force criterion (`fmax`, cell forces included) and step limit, one torch thread. Writes `summary.json`: seconds
per structure by each path, their ratio, and the final energies' differences (median, largest) per atom.
torch-sim is a measurement dependency only (pip install torch-sim-atomistic), not one of crystallm's.
"""

import itertools
import time
from pathlib import Path

import numpy as np
import torch

from crystallm.evaluation import reports
from crystallm.evaluation.readers import iter_entries
from crystallm.evaluation.relaxation import POTENTIALS, RelaxationSettings, relax_structure
from crystallm.evaluation.scoring import structure_of_entry
from crystallm.stage_config import read_stage_config


def _batched(structures, potential: str, settings: RelaxationSettings) -> tuple[list[float], float]:
    """Final energies per atom (eV/atom) of a torch-sim relaxation of all structures at once, and its seconds."""
    import sevenn.calculator
    import torch_sim as ts
    from sevenn.util import load_checkpoint

    # torch-sim 0.3 (the last for Python 3.11) imports a name sevenn 0.13 no longer has: the type of a TorchScript
    # model, which it only compares against. Given back here; newer torch-sim needs Python 3.12.
    sevenn.calculator.torch_script_type = getattr(sevenn.calculator, "torch_script_type", torch.jit.ScriptModule)
    from torch_sim.models.sevennet import SevenNetModel

    model = SevenNetModel(load_checkpoint(POTENTIALS[potential]).build_model(), device="cpu")
    started = time.perf_counter()
    state = ts.optimize(system=structures, model=model, optimizer=ts.frechet_cell_fire, max_steps=settings.steps,
                        convergence_fn=ts.generate_force_convergence_fn(force_tol=settings.fmax))
    energies = model(state)["energy"].detach().numpy()
    counts = [len(structure) for structure in structures]
    return [float(e) / n for e, n in zip(energies, counts)], time.perf_counter() - started


def main() -> None:
    config = read_stage_config(__doc__)
    torch.set_num_threads(1)
    entries = itertools.islice(iter_entries(config["input"]), config["count"])
    structures = [structure_of_entry(entry)[0] for entry in entries]
    settings = RelaxationSettings(steps=config["steps"], fmax=config["fmax"], potential=config["potential"])
    relax_structure(structures[0], settings)  # the model loads once, outside the timing
    started = time.perf_counter()
    one_by_one = [relax_structure(structure, settings) for structure in structures]
    ase_seconds = time.perf_counter() - started
    batched, batched_seconds = _batched(structures, config["potential"], settings)
    difference = np.array([b - r["energy_per_atom"] for b, r in zip(batched, one_by_one) if not r["error"]])
    summary = {"input": config["input"], "structures": len(structures), "potential": config["potential"],
               "steps": settings.steps, "fmax": settings.fmax,
               "ase_seconds_per_structure": ase_seconds / len(structures),
               "batched_seconds_per_structure": batched_seconds / len(structures),
               "speedup": ase_seconds / batched_seconds,
               "ase_median_steps": float(np.median([r.get("steps", 0) for r in one_by_one])),
               "energy_difference_median_abs": float(np.median(np.abs(difference))),
               "energy_difference_max_abs": float(np.max(np.abs(difference)))}
    reports.write_json(summary, Path(config["output_dir"]) / "summary.json")
    print(summary)


if __name__ == "__main__":
    main()
