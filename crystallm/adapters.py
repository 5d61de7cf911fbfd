"""Property adapters: one PEFT LoRA adapter per property, saved in `<model>/adapters/<property>/` (the layout
`PeftModel.save_pretrained` gives a named adapter) and trained by `train/adapter.py`.

Loading one wraps the base model in a `PeftModel`; loading a second adds it to the same wrapper and
`set_adapter` switches between them, so the base weights are read once. Under `disable_adapter()` the wrapped
model is the base model again (unconditioned generation uses that).
"""

from __future__ import annotations

from pathlib import Path

from crystallm.diffraction.encoder import (
    ENCODER_CONFIG_FILE,
    PATTERN_ADAPTER,
    PatternEncoderConfig,
    attach_pattern_encoder,
)
from crystallm.errors import CrystaLLMInputError
from crystallm.model_folder import loaded_from, require_safetensors

ADAPTERS_FOLDER = "adapters"


def available_adapters(folder: str | Path) -> list[str]:
    """Names of the adapters saved beside a model: `<folder>/adapters/<name>/adapter_config.json`.

    >>> from crystallm.model_folder import DEFAULT_MODEL
    >>> available_adapters(DEFAULT_MODEL)
    ['band_gap', 'formation_energy_per_atom', 'masked_atom']
    """
    root = Path(folder) / ADAPTERS_FOLDER
    return sorted(path.parent.name for path in root.glob("*/adapter_config.json"))


def use_adapter(model, adapter: str):
    """Make `adapter` the model's active adapter, loading it first if needed, and return the `PeftModel`.

    `adapter` is the name of an adapter saved beside the model (a property name: `band_gap`) or the folder of
    one (`runs/adapters/band_gap`, named after the folder). An unknown name lists the available ones.

    >>> from crystallm.generation import load_generator
    >>> model, tokenizer = load_generator()
    >>> model = use_adapter(model, "band_gap")
    >>> model = use_adapter(model, "formation_energy_per_atom")  # loaded beside the first; the base is shared
    >>> sorted(model.peft_config), model.active_adapter
    (['band_gap', 'formation_energy_per_atom'], 'formation_energy_per_atom')
    """
    from peft import PeftModel

    path = Path(adapter)
    name = path.name
    if isinstance(model, PeftModel) and name in model.peft_config:
        model.set_adapter(name)
        return model
    if not (path / "adapter_config.json").exists():
        folder = loaded_from(model)
        path = folder / ADAPTERS_FOLDER / adapter
        if not (path / "adapter_config.json").exists():
            known = available_adapters(folder)
            stage = "train/pattern_adapter.py" if adapter == PATTERN_ADAPTER else "train/adapter.py"
            raise CrystaLLMInputError(f"no adapter {adapter!r} for the model in {folder}; available: "
                                      f"{', '.join(known) or 'none'} (train one with {stage})")
    require_safetensors(path, "adapter")
    if (path / ENCODER_CONFIG_FILE).exists():  # the pattern adapter: its encoder's weights load with it
        attach_pattern_encoder(model, PatternEncoderConfig.from_file(path))
    if isinstance(model, PeftModel):
        model.load_adapter(path, adapter_name=name)
        model.set_adapter(name)
        return model
    return PeftModel.from_pretrained(model, path, adapter_name=name).eval()


def active_adapter(model) -> str | None:
    """The name of the model's active adapter, or None for a plain model."""
    from peft import PeftModel

    return model.active_adapter if isinstance(model, PeftModel) else None
