"""The settings of each training loop as one frozen object, read from a stage's YAML once (an unknown key is an
error naming it) and saved beside the weights it produced (`settings.json`). CrystaLLM's `TrainDefaults` and HF's
`TrainingArguments` are the models. See docs/model-pretraining-decoding.md, "Pretraining".
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from crystallm.errors import CrystaLLMInputError


@dataclass(frozen=True, kw_only=True)
class TrainingSettings:
    """What every loop shares (`make_accelerator` reads the last two)."""

    output_dir: str  # the run's folder: weights, log, checkpoint, settings.json
    seed: int = 0  # the batch order, every random draw and the held-out rows
    batch_size: int = 32  # rows a step, over all processes
    learning_rate: float = 1e-3  # the peak of the schedule
    max_steps: int = 1000  # optimizer steps
    progress: bool = True  # a progress bar
    mixed_precision: str = "bf16"  # "bf16", "fp16" or "no"; bf16 falls back to fp32 on a CPU without it natively
    gradient_accumulation_steps: int = 1  # micro-batches a step

    def __post_init__(self):
        positive = {"batch_size": self.batch_size, "max_steps": self.max_steps,
                    "gradient_accumulation_steps": self.gradient_accumulation_steps}
        for name, value in positive.items():
            if value < 1:
                raise CrystaLLMInputError(f"{name} {value}: at least 1")
        if not (math.isfinite(self.learning_rate) and self.learning_rate >= 0):
            raise CrystaLLMInputError(f"learning_rate {self.learning_rate}: a finite number of 0 or more")
        if self.mixed_precision not in ("bf16", "fp16", "no"):
            raise CrystaLLMInputError(f"mixed_precision {self.mixed_precision!r}: bf16, fp16 or no")

    @classmethod
    def from_dict(cls, values: dict) -> TrainingSettings:
        """The settings of a stage config; an unknown key, a missing required one or a value of the wrong kind is
        an error that names it.

        >>> PretrainingSettings.from_dict({"output_dir": "runs/x", "corpus": "c.csv.gz", "model": {}}).batch_size
        32
        >>> PretrainingSettings.from_dict({"output_dir": "runs/x", "corpus": "c.csv.gz", "model": {}, "lr": 1})
        Traceback (most recent call last):
        ...
        crystallm.errors.CrystaLLMInputError: unknown setting of PretrainingSettings: lr
        """
        fields = {item.name: item for item in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise CrystaLLMInputError(f"unknown setting of {cls.__name__}: {', '.join(unknown)}")
        converted = {}
        for name, value in values.items():
            kind = fields[name].type
            try:  # YAML reads 1e-3 as a string and lists where tuples are kept
                if value is not None and kind in ("float", "float | None"):
                    value = float(value)
                elif value is not None and kind in ("int", "int | None"):
                    value = int(value)
                elif isinstance(value, list):
                    value = tuple(value)
            except (TypeError, ValueError):
                raise CrystaLLMInputError(f"{name} {value!r}: expected {kind}") from None
            converted[name] = value
        try:
            return cls(**converted)
        except TypeError as error:  # a required setting is missing
            raise CrystaLLMInputError(f"{cls.__name__}: {error}") from None

    def save(self, directory: str | Path) -> Path:
        """Write the settings as JSON beside what they produce (`directory/settings.json`)."""
        path = Path(directory) / "settings.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1))
        return path


@dataclass(frozen=True, kw_only=True)
class PretrainingSettings(TrainingSettings):
    """`train/pretrain.py` (`crystallm.training.pretrain`)."""

    corpus: str  # a texts file of train/prepare_corpus.py
    model: dict  # CrystaLLMConfig's keyword arguments (sizes, n_positions, objective weights)
    init_from: str | None = None  # a model folder of the same shape: its weights, a new schedule (warm restart)
    max_rows: int | None = None  # the corpus's first rows only (smoke runs)
    exclude_sources: tuple[str, ...] = ()  # corpus sources left out
    eval_rows: int = 512  # held-out corpus rows (seeded), never trained on
    test_sets: dict = field(default_factory=dict)  # name: test source; losses on `test_rows` of its texts
    test_file: str = "data/test-sets.csv.gz"  # where the test sources' texts are
    test_rows: int = 2000  # seeded texts of each test set
    warmup_steps: int = 0  # linear warm-up, then cosine decay to `max_steps`
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0  # gradients clipped to this norm
    eval_every: int = 100  # steps between held-out losses
    save_every: int = 200  # steps between checkpoints
    stop_at_step: int | None = None  # end this invocation there with a checkpoint (train in chunks)
    keep_best: bool = False  # ship the model of the lowest held-out loss, not the last step's
    auxiliary_every: int = 1  # masked-atom and contrastive passes on every n-th batch only
    augment_descriptions: bool = False  # train each text as one of its equivalent texts, drawn at each visit
    num_proc: int | None = None  # worker processes that make hard views or descriptions


@dataclass(frozen=True, kw_only=True)
class AdapterSettings(TrainingSettings):
    """`train/adapter.py` and `train/pattern_adapter.py` (`crystallm.training.adapter`)."""

    corpus: str  # a texts file; property adapters join it with the sources' labels
    model: str | None = None  # the base model folder (None: the shipped default)
    property: str | None = None  # the property of a property adapter
    rank: int = 8  # LoRA rank
    alpha: int = 16  # LoRA alpha
    drop_probability: float = 0.1  # a row's condition dropped (classifier-free guidance learns the unconditional)
    max_rows: int | None = None  # the corpus's first rows only (the pattern adapter)
    num_proc: int | None = None  # worker processes that compute diffraction peaks
    clean_share: float = 0.25  # the pattern adapter: share of undegraded patterns
    lattice_weight: float = 1.0  # the pattern adapter: weight of the lattice-reading loss
    init_from: str | None = None  # an adapter folder of the same name and rank: its weights, a new schedule
    lr_schedule: str = "constant"  # "constant", or "cosine" decay to 0 at max_steps (HF's scheduler names)

    def __post_init__(self):
        super().__post_init__()
        if self.lr_schedule not in ("constant", "cosine"):
            raise CrystaLLMInputError(f"lr_schedule {self.lr_schedule!r}: constant or cosine")


@dataclass(frozen=True, kw_only=True)
class RefinerSettings(TrainingSettings):
    """`train/refiner.py` (`crystallm.refinement.training`)."""

    corpus: str  # a texts file: near-equilibrium crystals to denoise
    refiner: dict  # CrystalRefiner's keyword arguments, saved in the model's config
    sigma_range: tuple[float, float]  # noise levels drawn in training
    model: str | None = None  # the model whose hidden states the head reads (None: the shipped default)
    eval_rows: int = 256  # held-out corpus rows
    eval_sigmas: tuple[float, ...] = (0.03, 0.1, 0.3)  # noise levels of the held-out losses
    max_atoms: int = 96  # crystals with more atoms are skipped
    eval_every: int = 500  # steps between held-out losses
    mixed_precision: str = "no"  # geometry in fp32
    pairs: str | None = None  # (true, sampled) texts of train/skeleton_pairs.py: the model's own errors to undo
    pair_share: float = 1.0  # with `pairs`: share of a batch's rows (that have a pair) trained on it, not on noise
