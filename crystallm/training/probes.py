"""What a pretrained model learned, for the objectives' ablation: held-out causal-LM loss, masked-element
accuracy and retrieval of a hard view of the same crystal (the surrogates' MAE on a model's embeddings is
`properties.surrogates.select_regressor`'s)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from crystallm.generation.sampling import text_log_likelihoods
from crystallm.io import text_format
from crystallm.properties.embedding import unit_embeddings
from crystallm.training.collator import PretrainingCollator


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def causal_lm_loss(model, collator: PretrainingCollator, texts: list[str], batch_size: int = 32) -> float:
    """Mean next-token cross-entropy per token over texts (with <eos>)."""
    scores = text_log_likelihoods(model, collator.tokenizer, texts, batch_size)
    return -sum(log_p for log_p, _ in scores) / sum(tokens for _, tokens in scores)


@torch.no_grad()
def masked_atom_accuracy(model, collator: PretrainingCollator, texts: list[str], batch_size: int = 32) -> float:
    """Share of masked atom-site elements the bidirectional pass predicts exactly."""
    correct = total = 0
    for chunk in _batches(texts, batch_size):
        batch = collator(chunk)
        selected = batch["masked_labels"] != -100
        hidden = model.encode(batch["masked_input_ids"], batch["attention_mask"], bidirectional=True)[selected]
        correct += int((model.lm_head(hidden).argmax(-1) == batch["masked_labels"][selected]).sum())
        total += int(selected.sum())
    return correct / total


@dataclass(frozen=True)
class Retrieval:
    """Retrieval top-1 of hard views. Among all texts the formula line nearly names the crystal; within a formula
    group (the texts that state one reduced formula, groups of two or more) the embedding must tell polymorphs
    apart, which is what the novelty pre-filter needs."""

    top1: float  # among all texts
    top1_within_formula: float  # among the texts of the same formula
    texts_in_groups: int  # texts whose formula has at least two texts


def retrieval(model, collator: PretrainingCollator, texts: list[str], seed: int = 0) -> Retrieval:
    """Each crystal's hard view (`text_format.hard_view`: moved atoms, another volume, another description, shuffled
    rows) against the texts, by cosine of pooled embeddings: the share nearest to its own text, among all texts and
    among those of its formula."""
    rng = np.random.default_rng(seed)
    views = [text_format.hard_view(text, rng) for text in texts]
    similarity = unit_embeddings(model, collator.tokenizer, views) @ unit_embeddings(model, collator.tokenizer, texts).T
    own = np.arange(len(texts))
    formulas = np.array([text_format.format_formula(text_format.stated_formula(text)) for text in texts])
    same = formulas[:, None] == formulas[None, :]
    grouped = same.sum(axis=1) >= 2
    within = np.where(same, similarity, -np.inf).argmax(axis=1) == own
    return Retrieval(top1=float(np.mean(similarity.argmax(axis=1) == own)),
                     top1_within_formula=float(np.mean(within[grouped])) if grouped.any() else float("nan"),
                     texts_in_groups=int(grouped.sum()))

