"""The continuous refinement head: a small denoiser that turns the coarse numbers the language model wrote into
continuous lattice parameters and free coordinates (DESIGN.md sections 1 and 4).

Each continuous value of a text (a free lattice parameter or a free Wyckoff coordinate; fixed coordinates never
move) is one element of a set. Its features: the GPT's final hidden state at the token *before* the value (what
the model believed before writing it, not the digits it wrote), the coarse value, the noisy value and the noise
level. A small transformer over the set lets values see each other; it predicts the step back to the clean value.
Noise is Gaussian in normalized units: wrapped (periodic) for fractional coordinates, on log-lengths for cell
edges, in degrees for angles. Training (`train/refiner.py`) uses the frozen GPT teacher-forced on real texts; the
coarse value is what the GPT itself samples at that position, so the head learns to correct the LM's own errors.
At inference the head starts from the written values at a small noise level and takes a few denoising steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from crystallm import serialization

LENGTH, ANGLE, COORDINATE = 0, 1, 2
# Normalization per kind (log-length, degrees, fraction): one unit is about a typical LM error.
SCALES = torch.tensor([0.02, 1.0, 0.02])
FOURIER_FREQUENCIES = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0])


@dataclass
class ValueSlot:
    """One continuous value of a text: its kind, the token position whose hidden state conditions it, the
    positions of its first and second token, and where it goes in the CrystalText (lattice index or site, axis)."""

    kind: int
    context: int
    first: int
    lattice_index: int | None = None
    site: int | None = None
    param: int | None = None


def value_slots(tokens: list[str]) -> list[ValueSlot]:
    """The continuous values of a tokenized text (token strings, `<bos>` first), in writing order.

    >>> from crystallm.tokenization import CrystaLLMTokenizer
    >>> tokenizer = CrystaLLMTokenizer.from_format()
    >>> text = "data_NaCl\\n_space_group_name_H-M_alt Fm-3m\\n_cell_formula_units_Z 4\\n_cell_length_a 5.69\\n" + \\
    ...     serialization.LOOP_HEADER + "\\nNa 4a . . .\\nCl 4b . . ."
    >>> [(s.kind, s.lattice_index) for s in value_slots(tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"]))]
    [(0, 0)]
    """
    slots: list[ValueSlot] = []
    lattice_tags = {"\n" + tag: index for index, tag in enumerate(serialization.LATTICE_TAGS)}
    site, position = -1, 0
    while position < len(tokens):
        token = tokens[position]
        if token in lattice_tags:
            index = lattice_tags[token]
            slots.append(ValueSlot(LENGTH if index < 3 else ANGLE, position, position + 1, lattice_index=index))
            position += 3
        elif token.startswith("\n") and token[1:] in serialization.element_symbols() and position + 1 < len(tokens):
            site += 1
            position += 2  # element, Wyckoff symbol
            param = 0
            for _ in range(3):
                if position >= len(tokens):
                    break
                if tokens[position] == " " + serialization.FIXED_COORDINATE:
                    position += 1
                    continue
                slots.append(ValueSlot(COORDINATE, position - 1, position, site=site, param=param))
                param += 1
                position += 2
        else:
            position += 1
    return slots


def slot_values(crystal: serialization.CrystalText, slots: list[ValueSlot]) -> list[float]:
    """The values of the slots in a CrystalText, in the head's units (log-length, degrees, fraction)."""
    values = []
    for slot in slots:
        if slot.kind == COORDINATE:
            values.append(crystal.sites[slot.site].params[slot.param])
        else:
            value = crystal.lattice_parameters[slot.lattice_index]
            values.append(math.log(value) if slot.kind == LENGTH else value)
    return values


def with_values(crystal: serialization.CrystalText, slots: list[ValueSlot],
                values: list[float]) -> serialization.CrystalText:
    """A CrystalText with the slots' values replaced (head units in); lattice parameters that the crystal system
    ties are filled in by writing and reading the text again."""
    lattice = list(crystal.lattice_parameters)
    params = [list(site.params) for site in crystal.sites]
    for slot, value in zip(slots, values):
        if slot.kind == COORDINATE:
            params[slot.site][slot.param] = float(value) % 1.0
        elif slot.kind == LENGTH:
            lattice[slot.lattice_index] = float(np.clip(math.exp(value), serialization.MIN_LENGTH,
                                                        serialization.MAX_LENGTH - 0.01))
        else:
            lattice[slot.lattice_index] = float(np.clip(value, 1.0, 179.99))
    sites = tuple(serialization.AtomSite(site.element, site.wyckoff, tuple(p)) for site, p in zip(crystal.sites, params))
    edited = serialization.CrystalText(crystal.formula, crystal.space_group, crystal.formula_units, tuple(lattice),
                                       sites)
    return serialization.read_crystal_text(serialization.format_crystal_text(edited))


def periodic_difference(delta: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
    """Differences of fractional coordinates taken the short way round the unit circle."""
    return torch.where(kinds == COORDINATE, delta - torch.round(delta), delta)


class CrystalRefiner(nn.Module):
    """The denoiser: (hidden states, kinds, coarse values, noisy values, noise level) -> predicted clean values.

    >>> refiner = CrystalRefiner(hidden_size=32, width=16, layers=1, heads=2)
    >>> shape = (2, 5)
    >>> out = refiner(torch.zeros(*shape, 32), torch.full(shape, 2), torch.rand(shape), torch.rand(shape),
    ...               torch.ones(2), torch.ones(shape, dtype=torch.bool))
    >>> out.shape
    torch.Size([2, 5])
    """

    def __init__(self, hidden_size: int, width: int = 128, layers: int = 2, heads: int = 4, sigma_start: float = 4.0,
                 steps: int = 8):
        super().__init__()
        self.sigma_start, self.steps = sigma_start, steps  # inference defaults, saved in the model's config
        features = 2 * len(FOURIER_FREQUENCIES) + 3  # Fourier of the noisy value, offsets, log noise level
        self.hidden = nn.Linear(hidden_size, width)
        self.kind = nn.Embedding(3, width)
        self.values = nn.Sequential(nn.Linear(features, width), nn.GELU(), nn.Linear(width, width))
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(width, 1)

    def forward(self, hidden: torch.Tensor, kinds: torch.Tensor, coarse: torch.Tensor, noisy: torch.Tensor,
                sigma: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Predicted clean values (same units as the inputs) for each slot; `sigma` is per structure, normalized."""
        scale = SCALES.to(noisy.device)[kinds]
        offset = periodic_difference(noisy - coarse, kinds) / scale
        angle = 2 * math.pi * noisy.unsqueeze(-1) * FOURIER_FREQUENCIES.to(noisy.device)
        is_coordinate = (kinds == COORDINATE).unsqueeze(-1).float()
        fourier = torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1) * is_coordinate
        level = torch.log(sigma)[:, None, None].expand(*noisy.shape, 1)
        absolute = torch.where(kinds == ANGLE, noisy / 90 - 1, torch.where(kinds == LENGTH, noisy - 1.5, 0 * noisy))
        features = torch.cat([fourier, offset.unsqueeze(-1), absolute.unsqueeze(-1), level], dim=-1)
        x = self.hidden(hidden) + self.kind(kinds) + self.values(features)
        x = self.encoder(x, src_key_padding_mask=~mask)
        step = self.out(x).squeeze(-1) * scale  # predicted (clean - noisy), in value units
        return noisy + step

    def loss(self, hidden: torch.Tensor, kinds: torch.Tensor, coarse: torch.Tensor, clean: torch.Tensor,
             mask: torch.Tensor, sigma_range: tuple[float, float], generator: torch.Generator | None = None):
        """Denoising loss: noise the clean values at a random level per structure, predict them back (normalized
        squared error over the real slots)."""
        batch = clean.shape[0]
        low, high = math.log(sigma_range[0]), math.log(sigma_range[1])
        sigma = torch.exp(torch.rand(batch, generator=generator) * (high - low) + low).to(clean.device)
        scale = SCALES.to(clean.device)[kinds]
        noise = torch.randn(clean.shape, generator=generator).to(clean.device)
        noisy = clean + sigma[:, None] * scale * noise
        noisy = torch.where(kinds == COORDINATE, noisy % 1.0, noisy)
        predicted = self(hidden, kinds, coarse, noisy, sigma, mask)
        error = periodic_difference(predicted - clean, kinds) / scale
        return (error.pow(2) * mask).sum() / mask.sum().clamp(min=1)

    @torch.no_grad()
    def refine(self, hidden: torch.Tensor, kinds: torch.Tensor, coarse: torch.Tensor, mask: torch.Tensor,
               sigma_start: float | None = None, steps: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample clean values starting from the coarse ones at noise level `sigma_start` (normalized units),
        with `steps` deterministic denoising steps down a geometric schedule (the probability-flow update of a
        variance-exploding diffusion)."""
        sigma_start, steps = sigma_start or self.sigma_start, steps or self.steps
        scale = SCALES.to(coarse.device)[kinds]
        sigmas = torch.exp(torch.linspace(math.log(sigma_start), math.log(sigma_start / 20), steps)).tolist() + [0.0]
        noise = torch.randn(coarse.shape, generator=generator).to(coarse.device)
        x = coarse + sigmas[0] * scale * noise
        for sigma, following in zip(sigmas[:-1], sigmas[1:]):
            x = torch.where(kinds == COORDINATE, x % 1.0, x)
            clean = self(hidden, kinds, coarse, x, torch.full((x.shape[0],), sigma, device=x.device), mask)
            x = clean + (following / sigma) * periodic_difference(x - clean, kinds)
        return torch.where(kinds == COORDINATE, x % 1.0, x)


@dataclass
class SlotBatch:
    """Padded tensors of a batch of texts' values: hidden states (B, S, E), kinds, coarse and clean values, mask."""

    hidden: torch.Tensor
    kinds: torch.Tensor
    coarse: torch.Tensor
    clean: torch.Tensor
    mask: torch.Tensor
    slots: list[list[ValueSlot]]
    crystals: list[serialization.CrystalText]


def _sample_chunk(logits: torch.Tensor, ids: list[int], generator: torch.Generator | None) -> int:
    """Index into `ids` drawn from the model's distribution restricted to them."""
    probabilities = torch.softmax(logits[ids].float(), dim=0)
    return int(torch.multinomial(probabilities, 1, generator=generator))


@torch.no_grad()
def slot_batch(model, tokenizer, texts: list[str], lm_coarse: bool, generator: torch.Generator | None = None,
               vocabulary=None) -> SlotBatch:
    """Hidden states and values of texts for the head. `lm_coarse`: the coarse value of each slot is what the GPT
    samples there given the true prefix (training); otherwise the value written in the text (inference)."""
    encoded = tokenizer(texts, padding=True, return_tensors="pt", padding_side="right").to(model.device)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if model.device.type == "cpu" else torch.autocast("cuda")
    with autocast:
        hidden = model.encode(encoded["input_ids"], encoded["attention_mask"]).float()
    slots = [value_slots(tokenizer.convert_ids_to_tokens(row)) for row in encoded["input_ids"].tolist()]
    logits = {}
    if lm_coarse:  # the LM's distributions only where a value starts and continues (not the whole vocabulary grid)
        places = sorted({(row, p) for row, row_slots in enumerate(slots) for s in row_slots for p in (s.context, s.first)})
        if places:
            rows, columns = zip(*places)
            logits = dict(zip(places, model.lm_head(hidden[list(rows), list(columns)])))
    crystals = [serialization.read_crystal_text(text) for text in texts]
    width = max(1, max(len(s) for s in slots))
    shape = (len(texts), width)
    batch = SlotBatch(torch.zeros(*shape, hidden.shape[-1]), torch.zeros(shape, dtype=torch.long),
                      torch.zeros(shape), torch.zeros(shape), torch.zeros(shape, dtype=torch.bool), slots, crystals)
    for row, (row_slots, crystal) in enumerate(zip(slots, crystals)):
        clean = slot_values(crystal, row_slots)
        for column, (slot, value) in enumerate(zip(row_slots, clean)):
            batch.hidden[row, column] = hidden[row, slot.context]
            batch.kinds[row, column], batch.clean[row, column], batch.mask[row, column] = slot.kind, value, True
            batch.coarse[row, column] = _lm_value(logits, row, slot, value, vocabulary, generator) \
                if lm_coarse else value
    return batch


def _lm_value(logits: dict, row: int, slot: ValueSlot, clean: float, vocabulary, generator) -> float:
    """The value the GPT samples at a slot: its first chunk from its own distribution; the second from its
    distribution when the first chunk is the true one (the logits there were computed after the true chunk),
    else uniformly."""
    true = math.exp(clean) if slot.kind == LENGTH else clean
    if slot.kind == COORDINATE:
        first = _sample_chunk(logits[row, slot.context], vocabulary.coordinate_firsts, generator) / 100
        true_first = math.floor(round(true * 100, 6)) / 100
    else:
        parts = sorted(vocabulary.integer_parts.items(), key=lambda item: item[1])
        index = _sample_chunk(logits[row, slot.context], [i for i, _ in parts], generator)
        first, true_first = float(parts[index][1]), float(math.floor(round(true, 6)))
    if abs(first - true_first) < 1e-9:
        decimals = _sample_chunk(logits[row, slot.first], vocabulary.decimal_pairs, generator)
    else:
        decimals = int(torch.randint(100, (1,), generator=generator))
    value = first + decimals / (10_000 if slot.kind == COORDINATE else 100)
    return math.log(max(value, serialization.MIN_LENGTH)) if slot.kind == LENGTH else value


def refine_texts(model, tokenizer, texts: list[str], generator: torch.Generator | None = None,
                 ) -> list[serialization.CrystalText]:
    """The crystals of parseable texts with their continuous values refined by the model's head (one GPT forward
    pass, then the head's denoising steps). A crystal whose refined values do not make a valid text keeps the
    written ones.

    >>> from crystallm.configuration import CrystaLLMConfig
    >>> from crystallm.modeling import CrystaLLMForCausalLM
    >>> from crystallm.tokenization import CrystaLLMTokenizer
    >>> tokenizer = CrystaLLMTokenizer.from_format()
    >>> model = CrystaLLMForCausalLM(CrystaLLMConfig(n_layer=1, n_embd=32, n_head=2, refiner={"width": 16}))
    >>> text = "data_Po\\n_space_group_name_H-M_alt Pm-3m\\n_cell_formula_units_Z 1\\n_cell_length_a 3.35\\n" + \\
    ...     serialization.LOOP_HEADER + "\\nPo 1a . . ."
    >>> refined = refine_texts(model.eval(), tokenizer, [text])[0]
    >>> refined.space_group, 1.0 < refined.lattice_parameters[0] < 10.0
    (221, True)
    """
    from crystallm.errors import CrystaLLMInputError

    batch = slot_batch(model, tokenizer, texts, lm_coarse=False)
    values = model.refiner.refine(batch.hidden, batch.kinds, batch.coarse, batch.mask, generator=generator)
    refined = []
    for row, (crystal, slots) in enumerate(zip(batch.crystals, batch.slots)):
        try:
            refined.append(with_values(crystal, slots, values[row, :len(slots)].tolist()))
        except CrystaLLMInputError:
            refined.append(crystal)
    return refined
