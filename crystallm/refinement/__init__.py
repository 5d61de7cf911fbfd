"""The refinement head, in one place (docs/model-pretraining-decoding.md, "The refinement head"): its network
(`network`: `CrystalRefiner`, held by the model as `model.refiner`) and what runs it on crystals (`inference`:
crystals as free Wyckoff and lattice parameters, neighbour batches, `refine_texts`, held-out denoising errors).
Training it is a loop of `crystallm.training` (`training.refiner`), by the convention every loop follows."""

from crystallm.refinement.inference import CrystalGeometry, denoising_errors, refine_crystals, refine_texts
from crystallm.refinement.network import CrystalRefiner, GeometryBatch, RefinerOutput

__all__ = ["CrystalGeometry", "CrystalRefiner", "GeometryBatch", "RefinerOutput", "denoising_errors",
           "refine_crystals", "refine_texts"]
