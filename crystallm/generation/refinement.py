"""Running the continuous refinement head (`crystallm.modeling.CrystalRefiner`): it turns the coarse numbers the
language model wrote into continuous lattice parameters and free coordinates (DESIGN.md sections 1 and 4).

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

from crystallm.io import text_format

LENGTH, ANGLE, COORDINATE = 0, 1, 2


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
    ...     text_format.LOOP_HEADER + "\\nNa 4a . . .\\nCl 4b . . ."
    >>> [(s.kind, s.lattice_index) for s in value_slots(tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"]))]
    [(0, 0)]
    """
    slots: list[ValueSlot] = []
    lattice_tags = {"\n" + tag: index for index, tag in enumerate(text_format.LATTICE_TAGS)}
    site, position = -1, 0
    while position < len(tokens):
        token = tokens[position]
        if token in lattice_tags:
            index = lattice_tags[token]
            slots.append(ValueSlot(LENGTH if index < 3 else ANGLE, position, position + 1, lattice_index=index))
            position += 3
        elif token.startswith("\n") and token[1:] in text_format.element_symbols() and position + 1 < len(tokens):
            site += 1
            position += 2  # element, Wyckoff symbol
            param = 0
            for _ in range(3):
                if position >= len(tokens):
                    break
                if tokens[position] == " " + text_format.FIXED_COORDINATE:
                    position += 1
                    continue
                slots.append(ValueSlot(COORDINATE, position - 1, position, site=site, param=param))
                param += 1
                position += 2
        else:
            position += 1
    return slots


def slot_values(crystal: text_format.CrystalText, slots: list[ValueSlot]) -> list[float]:
    """The values of the slots in a CrystalText, in the head's units (log-length, degrees, fraction)."""
    values = []
    for slot in slots:
        if slot.kind == COORDINATE:
            values.append(crystal.sites[slot.site].params[slot.param])
        else:
            value = crystal.lattice_parameters[slot.lattice_index]
            values.append(math.log(value) if slot.kind == LENGTH else value)
    return values


def with_values(crystal: text_format.CrystalText, slots: list[ValueSlot],
                values: list[float]) -> text_format.CrystalText:
    """A CrystalText with the slots' values replaced (head units in); lattice parameters that the crystal system
    ties are filled in by writing and reading the text again."""
    lattice = list(crystal.lattice_parameters)
    params = [list(site.params) for site in crystal.sites]
    for slot, value in zip(slots, values):
        if slot.kind == COORDINATE:
            params[slot.site][slot.param] = float(value) % 1.0
        elif slot.kind == LENGTH:
            lattice[slot.lattice_index] = float(np.clip(math.exp(value), text_format.MIN_LENGTH,
                                                        text_format.MAX_LENGTH - 0.01))
        else:
            lattice[slot.lattice_index] = float(np.clip(value, 1.0, 179.99))
    sites = tuple(text_format.AtomSite(site.element, site.wyckoff, tuple(p)) for site, p in zip(crystal.sites, params))
    edited = text_format.CrystalText(crystal.formula, crystal.space_group, crystal.formula_units, tuple(lattice),
                                       sites)
    return text_format.read_crystal_text(text_format.format_crystal_text(edited))


@dataclass
class SlotBatch:
    """Padded tensors of a batch of texts' values: hidden states (B, S, E), kinds, coarse and clean values, mask."""

    hidden: torch.Tensor
    kinds: torch.Tensor
    coarse: torch.Tensor
    clean: torch.Tensor
    mask: torch.Tensor
    slots: list[list[ValueSlot]]
    crystals: list[text_format.CrystalText]


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
    # In the precision the caller set (no autocast of its own): on a CPU without native bf16 (AVX2 only), a bf16
    # forward pass over a whole batch of texts is ~50x slower than fp32.
    hidden = model.encode(encoded["input_ids"], encoded["attention_mask"]).float()
    slots = [value_slots(tokenizer.convert_ids_to_tokens(row)) for row in encoded["input_ids"].tolist()]
    logits = {}
    if lm_coarse:  # the LM's distributions only where a value starts and continues (not the whole vocabulary grid)
        places = sorted({(row, p) for row, row_slots in enumerate(slots) for s in row_slots for p in (s.context, s.first)})
        if places:
            rows, columns = zip(*places)
            logits = dict(zip(places, model.lm_head(hidden[list(rows), list(columns)])))
    crystals = [text_format.read_crystal_text(text) for text in texts]
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
    return math.log(max(value, text_format.MIN_LENGTH)) if slot.kind == LENGTH else value


def refine_texts(model, tokenizer, texts: list[str], generator: torch.Generator | None = None,
                 ) -> list[text_format.CrystalText]:
    """The crystals of parseable texts with their continuous values refined by the model's head (one GPT forward
    pass, then the head's denoising steps). A crystal whose refined values do not make a valid text keeps the
    written ones.

    >>> from crystallm.configuration import CrystaLLMConfig
    >>> from crystallm.modeling import CrystaLLMForCausalLM
    >>> from crystallm.tokenization import CrystaLLMTokenizer
    >>> tokenizer = CrystaLLMTokenizer.from_format()
    >>> model = CrystaLLMForCausalLM(CrystaLLMConfig(n_layer=1, n_embd=32, n_head=2, refiner={"width": 16}))
    >>> text = "data_Po\\n_space_group_name_H-M_alt Pm-3m\\n_cell_formula_units_Z 1\\n_cell_length_a 3.35\\n" + \\
    ...     text_format.LOOP_HEADER + "\\nPo 1a . . ."
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
