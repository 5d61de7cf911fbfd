"""Novelty against a reference collection: the embedding k-NN pre-filter against exhaustive StructureMatcher."""

import random

import numpy as np
import pytest
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Composition

from crystallm import data
from crystallm.cli import main
from crystallm.errors import CrystaLLMInputError
from crystallm.evaluation.readers import Entry
from crystallm.evaluation.reference import Embeddings, ReferenceSet
from crystallm.generation.sampling import load_generator
from crystallm.io import text_format
from crystallm.io.cif import structure_from_cif
from crystallm.properties.embedding import embed_entries, entry_embeddings


@pytest.fixture(scope="module")
def crowded_reference():
    """Corpus rows of 12 formulas that each have 4+ polymorphs in the corpus, and those formulas."""
    by_formula: dict[str, list[int]] = {}
    texts = data.load_texts("data/pretraining-corpus.csv.gz")["text"]
    for index, text in enumerate(texts):
        by_formula.setdefault(Composition(text.split("\n", 1)[0][5:]).reduced_formula, []).append(index)
    crowded = sorted(f for f, rows in by_formula.items() if len(rows) >= 4)
    formulas = random.Random(3).sample(crowded, 12)
    entries = [Entry(f"corpus-{i}", "text", texts[i]) for f in formulas for i in by_formula[f]]
    return entries, formulas


def test_knn_prefilter_gives_the_exhaustive_novelty(crowded_reference):
    entries, formulas = crowded_reference
    model, tokenizer = load_generator()
    reference = ReferenceSet("crowded", entries, embed_entries(entries), lambda structures: entry_embeddings(
        model, tokenizer, [Entry(str(i), "structure", s) for i, s in enumerate(structures)]))
    # Known materials, moved a little and written as supercells (not novel), and test-split crystals of the
    # same formulas (the corpus's leakage guard keeps their polymorphs out, so mostly novel).
    known = [(text_format.parse_structure(entry.payload) * (1, 1, 2)).perturb(0.02, seed=index)
             for index, entry in enumerate(random.Random(5).sample(entries, 12))]
    test = data.load_split("mp20-bt", "test")
    wanted = set(formulas)
    unseen = [structure_from_cif(cif) for cif in test["cif"]
              if Composition(cif.split("data_", 1)[1].split("\n", 1)[0]).reduced_formula in wanted][:12]
    queries = known + unseen
    assert len(unseen) >= 3 and max(len(reference.groups[f]) for f in formulas) > 3

    matcher = StructureMatcher()
    exhaustive = [not any(matcher.fit(query, reference.structure(row)) for row in range(len(reference)))
                  for query in queries]
    assert exhaustive[:len(known)] == [False] * len(known) and any(exhaustive[len(known):])
    assert reference.novel_mask(queries, neighbours=3) == exhaustive
    assert reference.novel_mask(queries) == exhaustive  # without the k-NN cut: every same-formula entry


def test_embed_writes_vectors_and_nearest_entries(tmp_path, crowded_reference, capsys):
    entries, _ = crowded_reference
    corpus = tmp_path / "reference.csv"
    corpus.write_text("id,text\n" + "".join(f'{e.name},"{e.payload}"\n' for e in entries[:30]))
    assert main(["embed", str(corpus), "--out", str(tmp_path / "reference.safetensors")]) == 0
    reference = Embeddings.from_file(tmp_path / "reference.safetensors")
    assert reference.names == tuple(e.name for e in entries[:30])
    assert np.allclose(np.linalg.norm(reference.vectors, axis=1), 1, atol=1e-5)
    # Each reference entry is its own nearest neighbour.
    assert main(["embed", str(corpus), "--out", str(tmp_path / "again.safetensors"), "--nearest",
                 str(tmp_path / "reference.safetensors"), "--top", "3"]) == 0
    rows = [line for line in (tmp_path / "again.nearest.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and all(f'"nearest": [{{"name": "{e.name}"' in row for e, row in zip(entries, rows))


def test_bad_embeddings_file_is_named(tmp_path):
    bad = tmp_path / "not-embeddings.safetensors"
    bad.write_bytes(b"\x00" * 16)
    with pytest.raises(CrystaLLMInputError, match="not-embeddings.safetensors: not an embeddings file"):
        Embeddings.from_file(bad)
    entries = [Entry("a", "text", "data_NaCl\n")]
    with pytest.raises(CrystaLLMInputError, match="are not those of"):
        ReferenceSet("other", entries, Embeddings(("b",), np.zeros((1, 4), np.float32), "m", "elsewhere"))
