"""What every training loop shares: the batch collator of the pretraining objectives, the length-grouped batch
order that resumes exactly, and the held-out split."""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from crystallm.io import text_format
from crystallm.tokenization import element_positions, encode_texts, row_element_token_ids


@dataclass
class PretrainingCollator:
    """Texts -> the keyword arguments of `CrystaLLMForCausalLM.forward` that compute the enabled objectives'
    losses (`model(**collator(texts)).loss`).

    Masked-atom inputs hide one element of each crystal, drawn at random, everywhere it is written (its formula
    token and every site row it starts) behind `<mask>`: predicting it from the rest is element substitution.
    The contrastive view is a hard view of the same crystal (`text_format.hard_view`: moved atoms, another volume,
    another description), its rows shuffled anew at each visit. `views` maps a text to its view made beforehand
    (`data.add_hard_views`: a view costs about 15 ms, 32 of them about as long as a training step); a text
    without one gets a view made on the spot. `descriptions` maps a text to its equivalent texts
    (`data.add_descriptions`): a text found there is trained as one of them, drawn anew at each visit.
    """

    tokenizer: object
    max_length: int = 512
    masked_atom: bool = True
    contrastive: bool = True
    seed: int = 0
    views: Mapping[str, str] | None = None
    descriptions: Mapping[str, Sequence[str]] | None = None

    def __post_init__(self):
        self.row_element_ids = row_element_token_ids(self.tokenizer)
        self.symbols = dict(zip(self.row_element_ids, text_format.element_symbols()))

    def __call__(self, texts: list[str], auxiliary: bool = True) -> dict[str, torch.Tensor]:
        """The batch of `texts`; `auxiliary=False` leaves out the masked-atom and contrastive inputs (a step that
        trains the causal LM only, when the auxiliary passes run on a share of the steps)."""
        rng = np.random.default_rng([self.seed, zlib.crc32("\x00".join(texts).encode())])
        written = [options[rng.integers(len(options))] if (options := (self.descriptions or {}).get(text)) else text
                   for text in texts]
        batch = encode_texts(self.tokenizer, written, self.max_length)
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        result = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": input_ids}
        if self.masked_atom and auxiliary:
            selected = torch.zeros_like(input_ids, dtype=torch.bool)
            for row, ids in enumerate(input_ids.tolist()):
                present = sorted({self.symbols[i] for i in ids if i in self.symbols})
                if present:
                    hidden = present[rng.integers(len(present))]
                    selected[row] = element_positions(self.tokenizer, input_ids[row], hidden)
            result["masked_input_ids"] = input_ids.masked_fill(selected, self.tokenizer.mask_token_id)
            result["masked_labels"] = input_ids.masked_fill(~selected, -100)
        if self.contrastive and auxiliary:
            views = [text_format.shuffle_sites(self.views[text], rng) if text in (self.views or {})
                     else text_format.hard_view(text, rng) for text in texts]
            view = encode_texts(self.tokenizer, views, self.max_length)
            result["view_input_ids"], result["view_attention_mask"] = view["input_ids"], view["attention_mask"]
        return result


def epoch_batches(lengths: np.ndarray, batch_size: int, epoch: int, seed: int, rank: int = 0, world: int = 1,
                  group: int = 50) -> list[np.ndarray]:
    """This process's batches of row indices for an epoch. Rows are shuffled (seeded by seed and epoch), sorted by
    length within runs of `group` batches so that a batch holds rows of similar length (little padding), cut into
    global batches of `batch_size * world` rows (the last incomplete one dropped) and shuffled; each process takes
    every `world`-th row of each global batch. So `world` processes of `batch_size` see, step for step, the rows
    one process of `batch_size * world` sees.

    >>> [b.tolist() for b in epoch_batches(np.array([5, 1, 5, 1, 5, 1]), 2, epoch=0, seed=0)]
    [[3, 5], [1, 2], [4, 0]]
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    size = batch_size * world
    span = size * group
    order = np.concatenate([chunk[np.argsort(lengths[chunk], kind="stable")]
                            for chunk in np.split(order, range(span, len(order), span))]) if len(order) else order
    batches = [order[i:i + size] for i in range(0, len(order) - size + 1, size)]
    return [batches[i][rank::world] for i in rng.permutation(len(batches))]


def held_out_split(texts: list[str], seed: int, rows: int) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts): `rows` texts drawn by `seed` are held out, the same for every loop that
    uses the same seed (the refinement head is judged on rows its base model never trained on).

    >>> held_out_split(["a", "b", "c", "d"], seed=0, rows=1)
    (['a', 'b', 'd'], ['c'])
    """
    holdout = np.random.default_rng(seed).permutation(len(texts))[:rows]
    held = set(holdout.tolist())
    return [text for i, text in enumerate(texts) if i not in held], [texts[i] for i in holdout]
