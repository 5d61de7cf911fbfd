"""How samples are drawn, as one frozen object: `SamplingSettings`, validated once where it is made, passed from
the command line, `design` and the stages through the run folder (which saves it and compares it on resume) to
`generate_structures`. HF's `GenerationConfig` is the model; `generate_kwargs` is the part HF's `generate` reads.
See docs/model-pretraining-decoding.md, "generate and its options".
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from crystallm import validity
from crystallm.errors import CrystaLLMInputError
from crystallm.generation.distances import DistanceFloor

DEFAULT_MAX_ATOMS = 160  # conventional cell; 99.9% of the pretraining corpus has at most this many atoms


@dataclass(frozen=True)
class SamplingSettings:
    """Every setting that decides which samples a run draws. Made once, checked once: a value outside its range
    raises CrystaLLMInputError naming it.

    >>> SamplingSettings(temperature=0.8, top_k=10).generate_kwargs()
    {'do_sample': True, 'temperature': 0.8, 'top_k': 10, 'top_p': 1.0, 'guidance_scale': 1.0}
    >>> SamplingSettings(temperature=-1)
    Traceback (most recent call last):
    ...
    crystallm.errors.CrystaLLMInputError: temperature -1: 0 (greedy) or a finite number above it
    """

    seed: int = 0  # sample i of a run is the same whatever the run's length, resumes or shards
    batch_size: int = 64  # samples drawn together (the seeds are per batch: part of what a run draws)
    temperature: float = 1.0  # 0: greedy decoding
    top_k: int | None = None  # None or 0: off
    top_p: float | None = None  # None or 1: off
    max_atoms: int = DEFAULT_MAX_ATOMS  # atoms in the conventional cell, at most
    guidance: float = 1.0  # classifier-free guidance scale (HF's guidance_scale); 1: none
    min_distance: float = validity.MIN_DISTANCE  # Å: no two atoms closer (the grammar masks such choices); 0: off
    covalent_fraction: float | None = None  # with it, the floor is also this fraction of the covalent radii's sum
    charge_neutral: bool = False  # close only formulas that pass SMACT's test
    grammar: bool = True  # False only to measure what the grammar buys
    refine: bool | None = None  # the model's refinement head; None: where the head is on by default
    symmetrize: bool = False  # snap each structure to the symmetry spglib finds at symprec 0.1
    bf16: bool | None = None  # bf16 autocast on a CPU; None: where it is faster (`crystallm.compute.bf16_pays`)

    def __post_init__(self):
        problems = [
            (self.batch_size < 1, f"batch size {self.batch_size}: at least 1"),
            (self.seed < 0, f"seed {self.seed}: 0 or more"),
            (not (math.isfinite(self.temperature) and self.temperature >= 0),
             f"temperature {self.temperature}: 0 (greedy) or a finite number above it"),
            (self.top_k is not None and self.top_k < 0, f"top-k {self.top_k}: 0 (off) or more"),
            (self.top_p is not None and not 0 < self.top_p <= 1, f"top-p {self.top_p}: a probability in (0, 1]"),
            (self.max_atoms < 1, f"max atoms {self.max_atoms}: at least 1"),
            (not (math.isfinite(self.guidance) and self.guidance >= 1),
             f"guidance {self.guidance}: 1 (none) or a finite number above it"),
            (not (math.isfinite(self.min_distance) and self.min_distance >= 0),
             f"min distance {self.min_distance}: 0 (off) or a finite number of Å above it"),
            (self.covalent_fraction is not None and not (math.isfinite(self.covalent_fraction)
                                                        and self.covalent_fraction > 0),
             f"covalent fraction {self.covalent_fraction}: a finite number above 0"),
        ]
        for bad, message in problems:
            if bad:
                raise CrystaLLMInputError(message)

    def replace(self, **changes) -> SamplingSettings:
        """A copy with `changes`, checked again."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The settings as JSON-ready values (a run folder's `run.json` holds them)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> SamplingSettings:
        """Settings from `to_dict`'s values; an unknown key is an error that names it.

        >>> SamplingSettings.from_dict({"seed": 3}).seed
        3
        """
        unknown = set(values) - {field.name for field in dataclasses.fields(cls)}
        if unknown:
            raise CrystaLLMInputError(f"unknown sampling settings: {', '.join(sorted(unknown))}")
        return cls(**values)

    def distance_floor(self) -> DistanceFloor | None:
        """The grammar's distance floor, or None when it is off."""
        if not self.min_distance and self.covalent_fraction is None:
            return None
        return DistanceFloor(self.min_distance, self.covalent_fraction)

    def generate_kwargs(self) -> dict:
        """The keyword arguments of HF's `generate` that these settings decide."""
        sampling = {"do_sample": True, "temperature": self.temperature, "top_k": self.top_k or 0,
                    "top_p": self.top_p or 1.0} if self.temperature > 0 else {"do_sample": False}
        return sampling | {"guidance_scale": self.guidance}
