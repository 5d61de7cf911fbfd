"""Distribution metrics against a reference set: Wasserstein distances and coverage (COV-R / COV-P)."""

from __future__ import annotations

import warnings

import numpy as np
from pymatgen.core import Structure
from scipy.spatial.distance import cdist
from scipy.stats import wasserstein_distance

MP20_COVERAGE_CUTOFFS = {"structure": 0.4, "composition": 10.0}  # docs/architecture.md, as CDVAE


def wasserstein_distances(densities: list[float], element_counts: list[int], reference_densities: list[float],
                          reference_element_counts: list[int]) -> dict[str, float]:
    """Wasserstein distance of density (g/cm^3) and of the number of elements, generated vs reference.

    >>> wasserstein_distances([1.0, 2.0], [2, 3], [1.0, 2.0], [2, 2])
    {'density': 0.0, 'num_elements': 0.5}
    """
    return {"density": float(wasserstein_distance(densities, reference_densities)),
            "num_elements": float(wasserstein_distance(element_counts, reference_element_counts))}


_SITE_FINGERPRINT = None
_COMPOSITION_FINGERPRINT = None


def fingerprints(structure: Structure) -> tuple[np.ndarray, np.ndarray] | None:
    """CDVAE's fingerprints: CrystalNN 'ops' site fingerprint averaged over sites, and Magpie composition
    features (matminer). None where the structure cannot be fingerprinted."""
    global _SITE_FINGERPRINT, _COMPOSITION_FINGERPRINT
    if _SITE_FINGERPRINT is None:
        from matminer.featurizers.composition import ElementProperty
        from matminer.featurizers.site import CrystalNNFingerprint

        _SITE_FINGERPRINT = CrystalNNFingerprint.from_preset("ops")
        _COMPOSITION_FINGERPRINT = ElementProperty.from_preset("magpie", impute_nan=True)
    try:
        with warnings.catch_warnings():  # CrystalNN warns about radii on every site
            warnings.simplefilter("ignore")
            sites = np.array([_SITE_FINGERPRINT.featurize(structure, i) for i in range(len(structure))])
            composition = np.array(_COMPOSITION_FINGERPRINT.featurize(structure.composition), dtype=float)
    except (ValueError, RuntimeError, IndexError):
        return None
    if not np.isfinite(sites).all() or not np.isfinite(composition).all():
        return None
    return sites.mean(axis=0), composition


def coverage(structure_fps: np.ndarray, composition_fps: np.ndarray, reference_structure_fps: np.ndarray,
             reference_composition_fps: np.ndarray, structure_cutoff: float = 0.4,
             composition_cutoff: float = 10.0) -> dict[str, float]:
    """COV-R (share of reference structures with a generated one within both cutoffs) and COV-P (share of
    generated structures with a reference one within both). Composition features are standardized with
    the reference set's mean and standard deviation (CDVAE used fixed MP-20 training statistics, which are
    not available here).

    >>> fps = np.eye(3)
    >>> coverage(fps, fps, fps, fps)
    {'cov_recall': 1.0, 'cov_precision': 1.0}
    """
    mean = reference_composition_fps.mean(axis=0)
    std = reference_composition_fps.std(axis=0)
    std[std == 0] = 1.0
    generated_comp = (composition_fps - mean) / std
    reference_comp = (reference_composition_fps - mean) / std
    structure_distance = cdist(structure_fps, reference_structure_fps)
    composition_distance = cdist(generated_comp, reference_comp)
    recall = (structure_distance.min(axis=0) <= structure_cutoff) & (composition_distance.min(axis=0)
                                                                     <= composition_cutoff)
    precision = (structure_distance.min(axis=1) <= structure_cutoff) & (composition_distance.min(axis=1)
                                                                        <= composition_cutoff)
    return {"cov_recall": float(recall.mean()), "cov_precision": float(precision.mean())}
