"""Properties of generated structures: surrogate predictors from the model's embeddings (stored without
pickle) and the conditional benchmark of the property adapters."""
