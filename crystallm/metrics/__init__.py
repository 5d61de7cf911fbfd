"""Evaluation metrics, one module per family (DESIGN.md section 5): `validity`, `symmetry_stats`, `matching`
(uniqueness, novelty, CSP) and `distribution` (Wasserstein distances, coverage)."""
