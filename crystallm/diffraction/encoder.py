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
from crystallm.tokenization import PROPERTY_TOKENS, VALUE_TOKENS

PATTERN_TOKEN = PROPERTY_TOKENS[-1]  # marks a pattern condition; properties use the first tokens
PATTERN_ADAPTER = "xrd"  # the adapter's name
PREFIX_LENGTH = 8  # pattern slots in a prompt
ENCODER_CONFIG_FILE = "pattern_encoder.json"


@dataclasses.dataclass(frozen=True)
class PatternEncoderConfig:
    """The encoder's shape: the GPT's hidden size, profile length, convolution channels (each layer halves the
    length) and attention heads. It writes PREFIX_LENGTH embeddings."""

    hidden_size: int
    grid_size: int = len(GRID)
    channels: tuple[int, ...] = (32, 64, 128, 128)
    heads: int = 4

    def to_file(self, folder: str | Path) -> None:
        (Path(folder) / ENCODER_CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def from_file(cls, folder: str | Path) -> PatternEncoderConfig:
        values = json.loads((Path(folder) / ENCODER_CONFIG_FILE).read_text())
        return cls(**{**values, "channels": tuple(values["channels"])})


class PatternEncoder(nn.Module):
    """Strided 1-D convolutions over the square root of the profile (weak peaks count), then PREFIX_LENGTH
    learned queries attend over the positions (with position embeddings: a peak's place is the lattice) and are
    projected to the GPT's width.

    >>> encoder = PatternEncoder(PatternEncoderConfig(hidden_size=32))
    >>> encoder(torch.rand(2, len(GRID))).shape
    torch.Size([2, 8, 32])
    """

    def __init__(self, config: PatternEncoderConfig):
        super().__init__()
        self.config = config
        layers, width, length = [], 1, config.grid_size
        for channels in config.channels:
            layers += [nn.Conv1d(width, channels, kernel_size=7, stride=2, padding=3), nn.GELU()]
            width, length = channels, (length + 1) // 2
        self.convolutions = nn.Sequential(*layers)
        self.positions = nn.Parameter(torch.randn(length, width) * 0.02)
        self.queries = nn.Parameter(torch.randn(PREFIX_LENGTH, width) * 0.02)
        self.attention = nn.MultiheadAttention(width, config.heads, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.projection = nn.Linear(width, config.hidden_size)

    def forward(self, profiles: torch.Tensor) -> torch.Tensor:
        features = self.convolutions(profiles.clamp(min=0).sqrt().unsqueeze(1)).transpose(1, 2) + self.positions
        queries = self.queries.expand(len(profiles), -1, -1)
        pooled, _ = self.attention(queries, features, features, need_weights=False)
        return self.projection(self.norm(pooled))


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
    (rows of `profiles`, one per sequence of the batch); the rest of the input embeds as usual.

    >>> from crystallm.configuration import CrystaLLMConfig
    >>> from crystallm.modeling import CrystaLLMForCausalLM
    >>> from crystallm.tokenization import CrystaLLMTokenizer
    >>> tokenizer = CrystaLLMTokenizer.from_format()
    >>> model = CrystaLLMForCausalLM(CrystaLLMConfig(vocab_size=len(tokenizer), n_layer=1, n_embd=32, n_head=2))
    >>> attach_pattern_encoder(model, PatternEncoderConfig(hidden_size=32))
    >>> ids = tokenizer([pattern_prefix() + "data_NaCl"] * 2, return_tensors="pt")["input_ids"]
    >>> with pattern_conditioning(model, tokenizer, np.stack([np.zeros(len(GRID)), np.ones(len(GRID))])):
    ...     logits = model(ids).logits
    >>> bool((logits[0] != logits[1]).any())  # the same tokens, two patterns
    True
    """
    base = _base(model)
    encoder = base.pattern_encoder
    slot_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(VALUE_TOKENS)), device=base.device)
    profiles = torch.as_tensor(np.asarray(profiles), dtype=torch.float32, device=base.device)

    def replace_slots(module, inputs, output):
        ids = inputs[0]
        slots = torch.isin(ids, slot_ids)
        if not slots.any():  # generation steps after the prompt
            return output
        prefix = encoder(profiles)
        rows = torch.arange(len(ids), device=ids.device)[:, None].expand_as(ids)[slots]
        slot = torch.searchsorted(slot_ids, ids[slots])  # value tokens have consecutive ids
        output = output.clone()
        output[slots] = prefix[rows, slot].to(output.dtype)
        return output

    handle = base.get_input_embeddings().register_forward_hook(replace_slots)
    try:
        yield
    finally:
        handle.remove()
