"""The refinement head, in one place (docs/model-pretraining-decoding.md, "The refinement head"): its network
(`network`: `CrystalRefiner`, held by the model as `model.refiner`), what runs it on crystals (`inference`:
crystals as free Wyckoff and lattice parameters, neighbour batches, `refine_texts`, held-out denoising errors) and
its training entry point (`training.train_refiner`, by the accelerate convention of every loop). The first two sit
with the model in the layers; `training` with the other training loops, so this package does not import it."""

from crystallm.refinement.inference import CrystalGeometry, denoising_errors, pair_errors, refine_crystals, refine_texts
from crystallm.refinement.network import CrystalRefiner, GeometryBatch, RefinerOutput

__all__ = ["CrystalGeometry", "CrystalRefiner", "GeometryBatch", "RefinerOutput", "denoising_errors",
           "pair_errors", "refine_crystals", "refine_texts"]
