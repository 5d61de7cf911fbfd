"""Training loops, one accelerate convention for all: pretraining (`pretrain`), a property's LoRA adapter
(`adapter`), the refinement head (`refiner`); the collator and batch order they share (`collator`); and the probes
that judge what pretraining learned (`probes`). The runnable stages are train/*.py with configs/*.yaml."""
