"""A crystal's embedding: the pretrained model's mean-pooled hidden states over its canonical text, scaled to
unit length, so that cosine similarity finds the nearest known materials (`crystallm embed --nearest`) and
pre-filters novelty checks against a large reference (`knn_reference`). Vectors travel as safetensors, with their
names in the metadata (`crystallm.evaluation.reference.Embeddings`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pymatgen.core import Structure

from crystallm.evaluation.readers import Entry
from crystallm.evaluation.reference import Embeddings, ReferenceSet
from crystallm.evaluation.scoring import structure_of_entry
from crystallm.generation.sampling import load_generator
from crystallm.io import text_format
from crystallm.properties.surrogates import embed


def unit_embeddings(model, tokenizer, texts: list[str]) -> np.ndarray:
    """Pooled embeddings of texts (`surrogates.embed`), each scaled to unit length.

    >>> model, tokenizer = load_generator()
    >>> vectors = unit_embeddings(model, tokenizer, ["data_NaCl", "data_Si"])
    >>> vectors.shape, bool(np.allclose(np.linalg.norm(vectors, axis=1), 1))
    ((2, 256), True)
    """
    order = np.argsort([len(text) for text in texts], kind="stable")  # batches of like length: little padding
    vectors = np.empty((len(texts), model.config.n_embd), dtype=np.float32)
    vectors[order] = embed(model, tokenizer, [texts[i] for i in order])
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def _entry_text(entry: Entry) -> str:
    if entry.kind == "text":
        return entry.payload
    return text_format.serialize_structure(structure_of_entry(entry)[0])  # canonical, as the corpus is written


def entry_embeddings(model, tokenizer, entries: list[Entry]) -> np.ndarray:
    """Unit embeddings of entries, row by row; NaN rows for entries that cannot be read or written as text (a
    NaN row is nobody's neighbour, and a query with one is matched against its whole formula group)."""
    texts: dict[int, str] = {}
    for index, entry in enumerate(entries):
        try:
            texts[index] = _entry_text(entry)
        except Exception:  # noqa: BLE001 - any unreadable entry keeps its row
            continue
    vectors = np.full((len(entries), model.config.n_embd), np.nan, dtype=np.float32)
    if texts:
        vectors[list(texts)] = unit_embeddings(model, tokenizer, list(texts.values()))
    return vectors


def embed_entries(entries: list[Entry], model: str | Path | None = None, source: str = "") -> Embeddings:
    """The embeddings of a collection's entries by `model` (default: the shipped model).

    >>> import itertools
    >>> from crystallm.evaluation.readers import iter_entries
    >>> vectors = embed_entries(list(itertools.islice(iter_entries("mp20-bt/test"), 3)))
    >>> vectors.names, vectors.vectors.shape
    (('mp-10009', 'mp-1225695', 'mp-1224266'), (3, 256))
    """
    loaded, tokenizer = load_generator(model)
    return Embeddings(tuple(entry.name for entry in entries), entry_embeddings(loaded, tokenizer, entries),
                      str(model or ""), source)


def knn_reference(source: str | Path, embeddings_file: str | Path) -> ReferenceSet:
    """A reference collection with its `crystallm embed` file, ready for the k-NN pre-filter: queries are
    embedded by the model that embedded the reference, loaded once."""
    embeddings = Embeddings.from_file(embeddings_file)
    model, tokenizer = load_generator(embeddings.model or None)

    def embedder(structures: list[Structure]) -> np.ndarray:
        return entry_embeddings(model, tokenizer, [Entry(str(i), "structure", s) for i, s in enumerate(structures)])

    return ReferenceSet.from_collection(source, embeddings, embedder)
