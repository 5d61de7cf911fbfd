"""The pattern encoder: a powder profile (`patterns.GRID`) in, PREFIX_LENGTH embeddings out, which take the
place of the prompt's pattern slots, as vision-language models put image features in place of placeholder
tokens. The prompt of a pattern-conditioned sample is `<bos>` `PATTERN_TOKEN` `<value_0>` ... `<value_{k-1}>`
then the text (the formula, as in CSP). While `pattern_conditioning` is active, a hook on the input embedding
replaces the slots' embeddings with the encoder's output for that row, so `generate`, its KV cache and the
grammar processor work on token ids as usual.

The encoder lives on the base model as its `pattern_encoder` submodule and is trained and saved as part of a PEFT
adapter (`modules_to_save`), beside the adapter's LoRA weights; `pattern_encoder.json` in the adapter's folder
holds its configuration (`attach_pattern_encoder` rebuilds it before the adapter's weights load).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from crystallm.diffraction.patterns import GRID
from crystallm.io.text_format import read_crystal_text
from crystallm.tokenization import PROPERTY_TOKENS, VALUE_TOKENS

PATTERN_TOKEN = PROPERTY_TOKENS[-1]  # marks a pattern condition; properties use the first tokens
PATTERN_ADAPTER = "xrd"  # the adapter's name
PREFIX_LENGTH = 8  # pattern slots in a prompt
ENCODER_CONFIG_FILE = "pattern_encoder.json"
LATTICE_VALUES = 6  # what the encoder's lattice head predicts: `lattice_values`


def lattice_values(text: str) -> np.ndarray:
    """The cell a text writes, as the encoder's lattice head predicts it: the logarithms of a, b, c (Å) and the
    cosines of α, β, γ.

    >>> lattice_values("data_NaCl\\n_space_group_name_H-M_alt Fm-3m\\n_cell_formula_units_Z 4\\n_cell_length_a 5.64\\n"
    ...                "loop_\\n_atom_site_type_symbol\\n_atom_site_Wyckoff_symbol\\n_atom_site_fract_x\\n"
    ...                "_atom_site_fract_y\\n_atom_site_fract_z\\nNa 4a . . .\\nCl 4b . . .").round(3).tolist()
    [1.73, 1.73, 1.73, 0.0, 0.0, 0.0]
    """
    a, b, c, alpha, beta, gamma = read_crystal_text(text).lattice_parameters
    return np.array([np.log(a), np.log(b), np.log(c), *np.cos(np.radians([alpha, beta, gamma]))])


@dataclasses.dataclass(frozen=True)
class PatternEncoderConfig:
    """The encoder's shape: the GPT's hidden size, the mean norm of its token embeddings (the size each prefix
    vector is given), profile length, convolution channels (each layer halves the length) and the width of the
    MLP. It writes PREFIX_LENGTH embeddings."""

    hidden_size: int
    embedding_norm: float = 1.0
    grid_size: int = len(GRID)
    channels: tuple[int, ...] = (32, 64, 64, 32)
    bottleneck: int = 256

    @classmethod
    def for_model(cls, model) -> PatternEncoderConfig:
        """The shape for a GPT: its width, and its token embeddings' mean norm."""
        embeddings = model.get_input_embeddings().weight.detach()
        return cls(hidden_size=embeddings.shape[1], embedding_norm=float(embeddings.norm(dim=-1).mean()))

    def to_file(self, folder: str | Path) -> None:
        (Path(folder) / ENCODER_CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def from_file(cls, folder: str | Path) -> PatternEncoderConfig:
        values = json.loads((Path(folder) / ENCODER_CONFIG_FILE).read_text())
        return cls(**{**values, "channels": tuple(values["channels"])})


class PatternEncoder(nn.Module):
    """Strided 1-D convolutions over the square root of the profile (weak peaks count), then an MLP over the
    flattened features, whose weights differ by position (a peak's place is the lattice), to PREFIX_LENGTH
    vectors. Each is normalized to the token embeddings' norm, so the prefix cannot drown the text: an unbounded
    prefix grew to 40 times that norm in training and carried almost nothing of the pattern. A linear lattice
    head reads the cell (`lattice_values`, standardized) from the prefix: trained with it, the prefix must carry
    the lattice, where the language-model loss alone let the prefix collapse to the same vectors for every
    pattern.

    >>> encoder = PatternEncoder(PatternEncoderConfig(hidden_size=32, embedding_norm=2.0))
    >>> prefix, lattice = encoder(torch.rand(2, len(GRID)))
    >>> prefix.shape, lattice.shape, [round(float(n), 3) for n in prefix.detach().norm(dim=-1)[0, :2]]
    (torch.Size([2, 8, 32]), torch.Size([2, 6]), [2.0, 2.0])
    """

    def __init__(self, config: PatternEncoderConfig):
        super().__init__()
        self.config = config
        layers, width, length = [], 1, config.grid_size
        for channels in config.channels:
            layers += [nn.Conv1d(width, channels, kernel_size=7, stride=2, padding=3), nn.GELU()]
            width, length = channels, (length + 1) // 2
        self.convolutions = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(width * length, config.bottleneck), nn.GELU(),
                                  nn.Linear(config.bottleneck, PREFIX_LENGTH * config.hidden_size))
        self.lattice_head = nn.Linear(PREFIX_LENGTH * config.hidden_size, LATTICE_VALUES)

    def forward(self, profiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix (rows × PREFIX_LENGTH × hidden size) and the standardized lattice it implies (rows × 6)."""
        features = self.convolutions(profiles.clamp(min=0).sqrt().unsqueeze(1))
        prefix = self.head(features).view(len(profiles), PREFIX_LENGTH, self.config.hidden_size)
        prefix = nn.functional.normalize(prefix, dim=-1) * self.config.embedding_norm
        return prefix, self.lattice_head(prefix.flatten(1))


def pattern_prefix() -> str:
    """The tokens before the text of a pattern-conditioned prompt: the marker and the slots.

    >>> pattern_prefix()[:30]
    '<prop_15><value_0><value_1><va'
    """
    return PATTERN_TOKEN + "".join(VALUE_TOKENS[:PREFIX_LENGTH])


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def attach_pattern_encoder(model, config: PatternEncoderConfig) -> None:
    """Give the base model a fresh `pattern_encoder` (before training one, or before loading an adapter that
    holds one); a model that has one keeps it."""
    base = _base(model)
    if not hasattr(base, "pattern_encoder"):
        base.add_module("pattern_encoder", PatternEncoder(config).to(base.device))


@contextlib.contextmanager
def pattern_conditioning(model, tokenizer, profiles: np.ndarray | torch.Tensor):
    """Within the block, each row's pattern slots are embedded by the pattern encoder from that row's profile
    (rows of `profiles`, one per sequence of the batch); the rest of the input embeds as usual. The block gets a
    dict that holds, after a forward pass, the encoder's `lattice` prediction for the rows (for its training).

    >>> from crystallm.configuration import CrystaLLMConfig
    >>> from crystallm.modeling import CrystaLLMForCausalLM
    >>> from crystallm.tokenization import CrystaLLMTokenizer
    >>> tokenizer = CrystaLLMTokenizer.from_format()
    >>> model = CrystaLLMForCausalLM(CrystaLLMConfig(vocab_size=len(tokenizer), n_layer=1, n_embd=32, n_head=2))
    >>> attach_pattern_encoder(model, PatternEncoderConfig(hidden_size=32))
    >>> ids = tokenizer([pattern_prefix() + "data_NaCl"] * 2, return_tensors="pt")["input_ids"]
    >>> with pattern_conditioning(model, tokenizer, np.stack([np.zeros(len(GRID)), np.ones(len(GRID))])) as encoded:
    ...     logits = model(ids).logits
    >>> bool((logits[0] != logits[1]).any()), encoded["lattice"].shape  # the same tokens, two patterns
    (True, torch.Size([2, 6]))
    """
    base = _base(model)
    encoder = base.pattern_encoder
    slot_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(VALUE_TOKENS)), device=base.device)
    profiles = torch.as_tensor(np.asarray(profiles), dtype=torch.float32, device=base.device)
    encoded = {}

    def replace_slots(module, inputs, output):
        ids = inputs[0]
        slots = torch.isin(ids, slot_ids)
        if not slots.any():  # generation steps after the prompt
            return output
        prefix, encoded["lattice"] = encoder(profiles)
        rows = torch.arange(len(ids), device=ids.device)[:, None].expand_as(ids)[slots]
        slot = torch.searchsorted(slot_ids, ids[slots])  # value tokens have consecutive ids
        output = output.clone()
        output[slots] = prefix[rows, slot].to(output.dtype)
        return output

    handle = base.get_input_embeddings().register_forward_hook(replace_slots)
    try:
        yield encoded
    finally:
        handle.remove()
