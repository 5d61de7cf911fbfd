import random

import numpy as np
import pytest
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure
from pymatgen.core.operations import SymmOp

from crystallm import data
from crystallm.io import text_format
from crystallm.io.cif import structure_from_cif
from crystallm.tokenization import CrystaLLMTokenizer

CORPUS = "data/pretraining-corpus.csv.gz"
TEST_TEXTS = "data/test-sets.csv.gz"


@pytest.fixture(scope="module")
def corpus():
    return data.load_texts(CORPUS)


@pytest.fixture(scope="module")
def test_texts():
    return data.load_texts(TEST_TEXTS)


@pytest.mark.parametrize("name, rows, properties", [
    ("mp_20_biternary/test", 7118, ["formation_energy_per_atom", "band_gap", "e_above_hull"]),
    ("mpts_52/val", 5000, ["e_above_hull", "formation_energy_per_atom"]),
    ("perov_5/test", 3785, ["heat_all", "heat_ref", "dir_gap", "ind_gap"]),
    ("carbon_24/val", 2032, ["energy_per_atom"]),
    ("wbm/val", 10000, ["formation_energy_per_atom", "band_gap"]),
    ("aflow/bulk_modulus/train", 3433, ["bulk_modulus"]),
])
def test_sources_load_with_their_properties(name, rows, properties):
    dataset = data.load_source(name)
    assert dataset.num_rows == rows
    assert dataset.column_names == ["id", "source", "cif", *properties]
    assert all(prop in data.PROPERTY_UNITS for prop in properties)
    assert len(set(dataset["id"])) == rows


def test_benchmark_splits():
    assert data.load_split("mp20-bt", "train").num_rows == 7140
    assert data.load_split("perov-5", "train").num_rows == 1024 + 3787
    assert data.load_split("carbon-24", "test").num_rows == 2030
    with pytest.raises(KeyError, match="unknown split mp20-bt/val"):
        data.load_split("mp20-bt", "val")


@pytest.mark.slow
def test_no_test_structure_in_pretraining_corpus(corpus, test_texts):
    """The leakage guard, on the committed corpus: no test material id, no test text, and no corpus structure
    with a test structure's reduced formula and space group that StructureMatcher matches to it.

    Every same-key pair is matched except within carbon-24, where ~118k pairs of same-formula carbons would
    take ~15 minutes; there a seeded 100 of the ~2,000 carbon corpus rows are matched against every test
    structure of their key (the corpus build itself matched them all)."""
    raw_test_ids = {row_id for name in data.TEST_SOURCES for row_id in data.load_source(name)["id"]}
    assert set(test_texts["id"]) <= raw_test_ids
    assert not raw_test_ids & set(corpus["id"])
    assert not set(corpus["text"]) & set(test_texts["text"])
    assert not set(corpus["source"]) & set(data.TEST_SOURCES)
    rows = list(zip(corpus["id"], corpus["source"], corpus["text"]))
    carbon = [row for row in rows if row[1].startswith("carbon_24")]
    candidates = [row for row in rows if not row[1].startswith("carbon_24")] + random.Random(11).sample(carbon, 100)
    leaks = data.find_leaks(candidates, zip(test_texts["id"], test_texts["source"], test_texts["text"]))
    assert leaks == []


@pytest.mark.slow
def test_committed_texts_are_current(corpus, test_texts):
    """The committed files hold what the current format writes for the raw CIFs (else re-run the stage)."""
    rng = random.Random(3)
    rows = [texts[index] for texts in (corpus, test_texts) for index in rng.sample(range(texts.num_rows), 10)]
    for source in {row["source"] for row in rows}:  # each source read once: the large ones take seconds
        raw = data.load_source(source)
        position = {row_id: index for index, row_id in enumerate(raw["id"])}
        for row in (row for row in rows if row["source"] == source):
            cif = raw[position[row["id"]]]["cif"]
            assert text_format.serialize_structure(structure_from_cif(cif)) == row["text"]


def test_guard_catches_a_disguised_test_structure(test_texts):
    rng = np.random.default_rng(5)
    tests = [test_texts[i] for i in (0, 1, 2)]
    candidates = []
    for i, row in enumerate(tests):
        structure = text_format.parse_structure(row["text"], primitive=True)
        structure.apply_operation(SymmOp.from_axis_angle_and_translation(rng.normal(size=3), 40.0))
        structure = Structure.from_sites([structure[j] for j in rng.permutation(len(structure))])
        structure.make_supercell([1, 1, 2])
        candidates.append((f"new-{i}", "somewhere", text_format.serialize_structure(structure)))
    unrelated = test_texts[test_texts.num_rows - 1]
    candidates.append(("new-unrelated", "somewhere",
                       text_format.serialize_structure(text_format.parse_structure(unrelated["text"]))))
    candidates.append((tests[0]["id"], "somewhere", unrelated["text"]))  # a test id under another text
    leaks = data.find_leaks(candidates, [(r["id"], r["source"], r["text"]) for r in tests], StructureMatcher())
    assert [leak.id for leak in leaks] == ["new-0", "new-1", "new-2", tests[0]["id"]]
    assert "StructureMatcher match" in leaks[0].reason and "material id" in leaks[-1].reason


def test_deduplicate_keeps_first_of_each_id_and_text():
    rows = [("a", "s1", "t1"), ("a", "s2", "t2"), ("b", "s1", "t1"), ("c", "s3", "t3")]
    assert data.deduplicate(rows) == [("a", "s1", "t1"), ("c", "s3", "t3")]


def test_tokenized_dataset_is_cached(corpus):
    tokenizer = CrystaLLMTokenizer.from_format()
    small = corpus.select(range(64))
    first = data.tokenize_texts(small, tokenizer)
    second = data.tokenize_texts(small, tokenizer)
    assert first.cache_files and first.cache_files == second.cache_files
    ids = first[0]["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == small[0]["text"]
