"""Novelty against a large reference (the pretraining corpus, 31k structures) without scoring the reference.

StructureMatcher only matches structures of the same reduced formula, and a crystallm text states its reduced
formula on its first line, so the reference is grouped by formula from the raw entries, and a reference
structure is parsed only when a query of its formula needs it. With embeddings of the reference (`crystallm
embed`, `crystallm.properties.embedding`) and the means to embed the queries the same way, each query is matched
against the `neighbours` nearest same-formula entries only (a k-NN pre-filter); without them, against every
same-formula entry, which is exact. Evaluation needs no model: whoever builds the set brings the embedder.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Composition, Structure
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from crystallm.errors import CrystaLLMInputError
from crystallm.evaluation import matching
from crystallm.evaluation.readers import Entry, iter_entries
from crystallm.evaluation.scoring import structure_of_entry
from crystallm.io import text_format


@dataclasses.dataclass(frozen=True)
class Embeddings:
    """Unit-length vectors of a collection's structures, row by row with `names`, made by `model` (a model
    folder or Hub id; "" for the shipped model, wherever it is installed). Saved as safetensors, with the names
    and the model in its metadata."""

    names: tuple[str, ...]
    vectors: np.ndarray
    model: str
    source: str

    def save(self, path: str | Path) -> None:
        save_file({"embeddings": np.ascontiguousarray(self.vectors, dtype=np.float32)}, str(path),
                  metadata={"names": json.dumps(list(self.names)), "model": self.model, "source": self.source})

    @classmethod
    def from_file(cls, path: str | Path) -> Embeddings:
        """Read a file written by `save` (`crystallm embed --out`)."""
        try:
            with safe_open(str(path), "np") as handle:
                metadata = handle.metadata() or {}
                vectors = handle.get_tensor("embeddings")
            names = tuple(json.loads(metadata["names"]))
        except (OSError, SafetensorError, KeyError, ValueError) as error:
            raise CrystaLLMInputError(f"{path}: not an embeddings file of `crystallm embed` "
                                      f"({type(error).__name__}: {error})") from None
        if len(names) != len(vectors):
            raise CrystaLLMInputError(f"{path}: {len(names)} names for {len(vectors)} vectors")
        return cls(names, vectors, metadata.get("model", ""), metadata.get("source", ""))

    def nearest(self, queries: np.ndarray, top: int) -> list[list[tuple[str, float]]]:
        """For each query vector, the `top` nearest rows by cosine similarity: (name, similarity), best first."""
        similarity = np.nan_to_num(queries @ self.vectors.T, nan=-np.inf)  # unreadable rows: nobody's neighbour
        top = min(top, len(self.names))
        best = np.argpartition(-similarity, top - 1, axis=1)[:, :top] if top else np.zeros((len(queries), 0), int)
        result = []
        for row, columns in zip(similarity, best):
            columns = columns[np.argsort(-row[columns])]
            result.append([(self.names[c], float(row[c])) for c in columns])
        return result


def reduced_formula(entry: Entry) -> str | None:
    """The reduced formula of an entry, read from a crystallm text's first line without parsing the text; a
    CIF or a structure is parsed. None for an entry that cannot be read."""
    if entry.kind == "text":
        try:
            return Composition(text_format.stated_formula(entry.payload)).reduced_formula
        except CrystaLLMInputError:
            return None
    try:
        return structure_of_entry(entry)[0].composition.reduced_formula
    except Exception:  # an unreadable reference entry is no match for anything
        return None


class ReferenceSet:
    """The entries of a reference collection grouped by reduced formula, parsed on demand.

    >>> reference = ReferenceSet.from_collection("mp20-bt/test")
    >>> query = reference.structure(0)
    >>> reference.novel_mask([query, query * (1, 1, 2)])  # a supercell is the same material
    [False, False]
    """

    def __init__(self, source: str, entries: list[Entry], embeddings: Embeddings | None = None,
                 embedder: Callable[[list[Structure]], np.ndarray] | None = None):
        self.source = source
        self.entries = entries
        self.embeddings = embeddings
        self.embedder = embedder  # structures -> unit vectors by the model of `embeddings`
        self.groups: dict[str, list[int]] = {}
        for index, entry in enumerate(entries):
            formula = reduced_formula(entry)
            if formula is not None:
                self.groups.setdefault(formula, []).append(index)
        if not self.groups:  # novelty against nothing would call every structure novel
            raise CrystaLLMInputError(f"{source}: no readable structure to use as the novelty reference "
                                      f"({len(entries)} entries)")
        self._structures: dict[int, Structure | None] = {}
        self._keys: dict[int, tuple[str, int] | None] = {}
        if embeddings is not None and list(embeddings.names) != [entry.name for entry in entries]:
            raise CrystaLLMInputError(f"the embeddings ({len(embeddings.names)} rows, of {embeddings.source or '?'}) "
                                      f"are not those of {source} ({len(entries)} entries): run `crystallm embed "
                                      f"{source} --out FILE` again")

    @classmethod
    def from_collection(cls, source: str | Path, embeddings: str | Path | Embeddings | None = None,
                        embedder: Callable[[list[Structure]], np.ndarray] | None = None) -> ReferenceSet:
        """Any collection `iter_entries` reads; `embeddings` (its `crystallm embed` file) and `embedder` for the
        k-NN pre-filter."""
        if embeddings is not None and not isinstance(embeddings, Embeddings):
            embeddings = Embeddings.from_file(embeddings)
        return cls(str(source), list(iter_entries(source)), embeddings, embedder)

    def __len__(self) -> int:
        return len(self.entries)

    def structure(self, index: int) -> Structure | None:
        if index not in self._structures:
            try:
                self._structures[index] = structure_of_entry(self.entries[index])[0]
            except Exception:  # unreadable: never matches
                self._structures[index] = None
        return self._structures[index]

    def _key(self, index: int) -> tuple[str, int] | None:
        if index not in self._keys:
            structure = self.structure(index)
            self._keys[index] = None if structure is None else matching.match_key(structure)
        return self._keys[index]

    def candidates(self, structure: Structure, vector: np.ndarray | None = None,
                   neighbours: int | None = None) -> list[int]:
        """Reference rows that could match `structure`: its formula's rows, the `neighbours` nearest to `vector`
        first when both are given (and only those)."""
        rows = self.groups.get(structure.composition.reduced_formula, [])
        usable = vector is not None and bool(np.isfinite(vector).all())
        if usable and neighbours is not None and self.embeddings is not None and len(rows) > neighbours:
            similarity = np.nan_to_num(self.embeddings.vectors[rows] @ vector, nan=-np.inf)
            rows = [rows[i] for i in np.argsort(-similarity, kind="stable")[:neighbours]]
        return rows

    def novel_mask(self, structures: list[Structure], matcher: StructureMatcher | None = None,
                   neighbours: int | None = None) -> list[bool]:
        """True for each structure that matches none of its candidates (see `candidates`). With `neighbours`, the
        reference's embeddings and its embedder, each is matched against its `neighbours` nearest same-formula
        entries only (the k-NN pre-filter)."""
        matcher = matching.check_matcher(matcher)
        knn = neighbours is not None and self.embeddings is not None and self.embedder is not None
        # Only a structure with more same-formula entries than `neighbours` needs its vector: most have none.
        crowded = [i for i, s in enumerate(structures)
                   if knn and len(self.groups.get(s.composition.reduced_formula, ())) > neighbours]
        vectors: list[np.ndarray | None] = [None] * len(structures)
        if crowded:
            for i, vector in zip(crowded, self.embedder([structures[i] for i in crowded])):
                vectors[i] = vector
        mask = []
        for structure, vector in zip(structures, vectors):
            rows = self.candidates(structure, vector, neighbours)
            key = matching.match_key(structure) if rows else None  # a Niggli reduction: only when needed
            mask.append(not any(self._key(row) == key and matcher.fit(structure, self.structure(row))
                                for row in rows))
        return mask
