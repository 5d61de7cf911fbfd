"""The model's numbers on a given skeleton: a crystal's formula, space group, Z and each site's element and Wyckoff
letter are forced, token for token, and the model samples only the numbers (the cell's lengths and angles, the free
coordinates). The pair (the model's numbers, the true ones) is an example of exactly the error the model makes:
what the refinement head is trained to remove (docs/model-pretraining-decoding.md, the refinement head).

Every number of the format is two tokens (`' 7.'` `'53'` for 7.53 Å, `' 0.41'` `'31'` for 0.4131), so a skeleton
is the true text's tokens with its number tokens left open, each to the tokens of its own kind.
"""

from __future__ import annotations

import re

import torch

from crystallm.errors import CrystaLLMInputError
from crystallm.io import text_format
from crystallm.tokenization import encode_texts

# The kinds of number token: a cell value's whole part (the format's lengths and angles lie in [1, 180)), a
# coordinate's first digits, and the two digits after either.
NUMBER_KINDS = {"whole part": re.compile(r"^ ([1-9]|[1-9]\d|1[0-7]\d)\.$"),
                "coordinate": re.compile(r"^ \d\.\d\d$"),
                "digits": re.compile(r"^\d\d$")}


CELL_START = "\n_cell_length_a"


def number_kinds(tokenizer) -> torch.Tensor:
    """(kinds, vocabulary) bool: which tokens are numbers of each kind of `NUMBER_KINDS`, in its order."""
    vocabulary = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return torch.tensor([[bool(pattern.match(token)) for token in vocabulary] for pattern in NUMBER_KINDS.values()])


@torch.no_grad()
def sample_on_skeleton(model, tokenizer, texts: list[str], seed: int = 0, temperature: float = 1.0) -> list[str]:
    """Each text with its numbers sampled by the model and everything else kept: the formula, the space group, Z,
    the sites' elements and Wyckoff letters, and each coordinate its Wyckoff position fixes (written `.`). A
    number is drawn among the tokens of its kind, each token in turn, the model reading what it drew before.

    >>> from crystallm.generation.sampling import load_generator
    >>> model, tokenizer = load_generator()
    >>> text = ("data_NaCl\\n_space_group_name_H-M_alt Fm-3m\\n_cell_formula_units_Z 4\\n_cell_length_a 5.64\\n"
    ...         + "loop_\\n_atom_site_type_symbol\\n_atom_site_Wyckoff_symbol\\n_atom_site_fract_x\\n"
    ...         + "_atom_site_fract_y\\n_atom_site_fract_z\\nNa 4a . . .\\nCl 4b . . .")
    >>> sampled = sample_on_skeleton(model, tokenizer, [text])[0]
    >>> sampled.replace(sampled.split()[6], "5.64") == text  # only the cell length may differ
    True
    """
    # One token over the limit is enough to tell which texts the model cannot read whole.
    batch = encode_texts(tokenizer, texts, model.config.n_positions + 1)
    too_long = (batch["attention_mask"].sum(1) > model.config.n_positions).nonzero().flatten().tolist()
    if too_long:
        raise CrystaLLMInputError(f"texts {too_long[:5]}: longer than the model reads ({model.config.n_positions} "
                                  f"tokens)")
    ids, mask = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
    kinds = number_kinds(tokenizer).to(model.device)  # (kinds, vocabulary)
    of_ids = kinds[:, ids]  # (kinds, batch, length)
    # Numbers from the cell on: the formula's counts before it (`data_Li12S4`) are part of the skeleton.
    in_cell = (ids == tokenizer.convert_tokens_to_ids(CELL_START)).cumsum(1) > 0
    kind_of = of_ids.float().argmax(0).masked_fill(~(of_ids.any(0) & in_cell & (mask == 1)), -1)  # -1: forced
    generator = torch.Generator(device=model.device).manual_seed(seed)
    out, past = ids.clone(), None
    for position in range(1, ids.shape[1]):
        output = model(out[:, position - 1:position], attention_mask=mask[:, :position], cache=past,
                       use_cache=True)
        past = output.past_key_values
        rows = (kind_of[:, position] >= 0).nonzero().flatten()
        if not len(rows):
            continue
        logits = output.logits[rows, -1].float() / temperature
        logits = logits.masked_fill(~kinds[kind_of[rows, position]], float("-inf"))
        out[rows, position] = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).flatten()
    return tokenizer.batch_decode(out.masked_fill(mask == 0, tokenizer.pad_token_id), skip_special_tokens=True)


def skeleton_pairs(model, tokenizer, texts: list[str], seed: int = 0, batch_size: int = 64) -> list[tuple[str, str]]:
    """(true text, the model's numbers on its skeleton) for each text the model reads whole and whose sampled
    numbers make a cell (angles that close), in the order of `texts`; batches of similar length, batch `k` seeded
    `seed + k * batch_size`.

    >>> from crystallm.generation.sampling import load_generator
    >>> model, tokenizer = load_generator()
    >>> text = ("data_NaCl\\n_space_group_name_H-M_alt Fm-3m\\n_cell_formula_units_Z 4\\n_cell_length_a 5.64\\n"
    ...         + "loop_\\n_atom_site_type_symbol\\n_atom_site_Wyckoff_symbol\\n_atom_site_fract_x\\n"
    ...         + "_atom_site_fract_y\\n_atom_site_fract_z\\nNa 4a . . .\\nCl 4b . . .")
    >>> [(true, sampled)] = skeleton_pairs(model, tokenizer, [text])
    >>> true == text and sampled.startswith("data_NaCl")
    True
    """
    texts = list(texts)
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    readable = [i for i, length in enumerate(lengths) if length < model.config.n_positions]
    order = sorted(readable, key=lambda i: len(texts[i]))  # batches of similar length: little padding
    sampled = {}
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        sampled |= dict(zip(rows, sample_on_skeleton(model, tokenizer, [texts[i] for i in rows], seed=seed + start)))
    return [(texts[i], sampled[i]) for i in readable if _makes_a_cell(sampled[i])]


def _makes_a_cell(text: str) -> bool:
    try:
        text_format.crystal_text_to_structure(text_format.read_crystal_text(text))
        return True
    except CrystaLLMInputError:
        return False
