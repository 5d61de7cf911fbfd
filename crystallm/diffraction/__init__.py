"""Powder diffraction: patterns (computed, read from files, degraded, compared) and the encoder that turns one
into prefix embeddings for pattern-conditioned generation."""
