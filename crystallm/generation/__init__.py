"""Generating structures: prompts and property conditions, the grammar that keeps every text parseable,
batched sampling with Hugging Face `generate`, the refinement head at inference, and the resumable run folder of
`crystallm generate`.

>>> from crystallm.generation import Prompt, generate_structures, load_generator
>>> model, tokenizer = load_generator()
>>> [sample] = generate_structures(model, tokenizer, Prompt.of(formula="NaCl"), num=1)
>>> sample.structure.composition.reduced_formula
'NaCl'
"""

from crystallm.generation.prompt import Prompt
from crystallm.generation.sampling import GeneratedSample, generate_structures, load_generator
from crystallm.generation.settings import SamplingSettings

__all__ = ["GeneratedSample", "Prompt", "SamplingSettings", "generate_structures", "load_generator"]
