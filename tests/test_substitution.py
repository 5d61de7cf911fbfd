"""Masked-atom pretraining as element substitution: the collator hides a whole element, `crystallm substitute`
ranks what could take its place, and recovery is measured against the baselines."""

import csv
import shutil

import pytest
import torch
from pymatgen.core import Composition, Lattice, Structure
from safetensors.torch import load_file

from crystallm import data
from crystallm.adapters import active_adapter
from crystallm.cli import main
from crystallm.errors import CrystaLLMInputError
from crystallm.evaluation.element_recovery import (
    RecoveryTask,
    data_mined_scores,
    frequency_scores,
    rank_of,
    recovery_tasks,
)
from crystallm.generation.sampling import load_generator
from crystallm.generation.substitution import (
    load_substitution_model,
    rank_substitutions,
    substitution_log_probabilities,
)
from crystallm.io import text_format
from crystallm.tokenization import CrystaLLMTokenizer
from crystallm.training.adapter import train_masked_atom_adapter
from crystallm.training.collator import PretrainingCollator
from crystallm.training.settings import AdapterSettings
from crystallm.validity import compositional_validity


@pytest.fixture(scope="module")
def corpus_texts():
    return data.load_texts("data/pretraining-corpus.csv.gz")["text"][:64]


def test_collator_hides_one_whole_element_per_crystal(corpus_texts):
    tokenizer = CrystaLLMTokenizer.from_format()
    batch = PretrainingCollator(tokenizer, contrastive=False)(corpus_texts)
    for text, masked, labels in zip(corpus_texts, batch["masked_input_ids"], batch["masked_labels"]):
        hidden = {token.strip() for token in tokenizer.convert_ids_to_tokens(labels[labels != -100].tolist())}
        assert len(hidden) == 1  # one element, in the formula and on each of its rows
        [element] = hidden
        rows = sum(site.element == element for site in text_format.read_crystal_text(text).sites)
        assert int((labels != -100).sum()) == rows + 1
        shown = set(tokenizer.convert_ids_to_tokens(masked.tolist()))
        assert element not in shown and "\n" + element not in shown


def test_substitutions_keep_the_cell_and_change_one_element(tiny_model_dir, corpus_texts):
    model, tokenizer = load_generator(tiny_model_dir)
    text = next(t for t in corpus_texts if len(text_format.read_crystal_text(t).formula) == 3)
    crystal = text_format.read_crystal_text(text)
    original = text_format.parse_structure(text)
    replaced = next(iter(crystal.formula))
    candidates = rank_substitutions(model, tokenizer, text, element=replaced, top=5)
    assert len(candidates) == 5
    assert [c.log_probability for c in candidates] == sorted((c.log_probability for c in candidates), reverse=True)
    for candidate in candidates:
        assert candidate.element not in crystal.formula and candidate.replaced == replaced
        assert candidate.structure.lattice == original.lattice and len(candidate.structure) == len(original)
        expected = {(candidate.element if e == replaced else e): n for e, n in original.composition.as_dict().items()}
        assert candidate.structure.composition == Composition(expected)
    neutral = rank_substitutions(model, tokenizer, text, element=replaced, top=3, charge_neutral=True)
    assert all(compositional_validity(c.structure) for c in neutral)


def test_substitute_writes_ranked_cifs_and_names_bad_input(tiny_model_dir, corpus_texts, tmp_path, capsys):
    path = tmp_path / "crystal.txt"
    path.write_text(corpus_texts[0])
    element = next(iter(text_format.read_crystal_text(corpus_texts[0]).formula))
    assert main(["substitute", str(path), "--element", element, "--top", "3", "--out", str(tmp_path / "out"),
                 "--model", str(tiny_model_dir), "--quiet"]) == 0
    with open(tmp_path / "out" / "candidates.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["rank"] for row in rows] == ["1", "2", "3"]
    assert all((tmp_path / "out" / row["cif"]).exists() for row in rows)
    with pytest.raises(CrystaLLMInputError, match="element Xe: not in the structure"):
        rank_substitutions(*load_generator(tiny_model_dir), corpus_texts[0], element="Xe")
    with pytest.raises(CrystaLLMInputError, match=r"site rows \[99\]"):
        rank_substitutions(*load_generator(tiny_model_dir), corpus_texts[0], sites=[99])


def test_a_masked_atom_adapter_learns_on_a_frozen_base_and_substitution_ranks_with_it(tiny_model_dir, corpus_texts,
                                                                                      tmp_path):
    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    train_masked_atom_adapter(AdapterSettings(model=str(base), corpus="data/pretraining-corpus.csv.gz", max_rows=8,
                                              output_dir=str(base / "adapters"), batch_size=8, learning_rate=5e-2,
                                              max_steps=40, rank=4))
    model, tokenizer = load_substitution_model(base)
    bare, _ = load_substitution_model(base, adapter=False)
    assert active_adapter(model) == "masked_atom" and active_adapter(bare) is None

    # Its objective is masked-atom prediction: on the rows it saw (an untrained 1-layer base leaves a LoRA little
    # to learn from, hence a few rows and a small margin) the masked-element loss falls.
    batch = PretrainingCollator(tokenizer, contrastive=False, seed=99)(list(corpus_texts[:8]))
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "masked_input_ids", "masked_labels")}
    model.config.masked_atom_weight = 1.0  # the base config leaves the objective off; its loss is computed on demand
    with torch.no_grad():
        trained = float(model(**inputs).masked_atom_loss)
        with model.disable_adapter():
            untrained = float(model(**inputs).masked_atom_loss)
            # and the base's generation is untouched: with the adapter off, the causal logits are the bare model's
            assert torch.equal(model(batch["input_ids"]).logits, bare(batch["input_ids"]).logits)
    assert trained < untrained - 0.03

    text = corpus_texts[0]
    element = next(iter(text_format.read_crystal_text(text).formula))
    assert substitution_log_probabilities(model, tokenizer, text, element) != \
        substitution_log_probabilities(bare, tokenizer, text, element)

    # A warm restart starts from the trained weights (a step at learning rate 0 keeps them exactly; LoRA's own
    # initialization would not), and an adapter of another rank is refused by name.
    settings = dict(model=str(base), corpus="data/pretraining-corpus.csv.gz", max_rows=8, batch_size=8,
                    max_steps=1, init_from=str(base / "adapters" / "masked_atom"), lr_schedule="cosine")
    restarted = train_masked_atom_adapter(AdapterSettings(**settings, output_dir=str(tmp_path / "again"),
                                                          learning_rate=0.0, rank=4))
    trained_weights = load_file(base / "adapters" / "masked_atom" / "adapter_model.safetensors")
    restarted_weights = load_file(restarted / "adapter_model.safetensors")
    assert restarted_weights.keys() == trained_weights.keys()
    assert all(torch.equal(value, trained_weights[key]) for key, value in restarted_weights.items())
    with pytest.raises(CrystaLLMInputError, match="init_from .*masked_atom: not an adapter of these settings"):
        train_masked_atom_adapter(AdapterSettings(**settings, output_dir=str(tmp_path / "other"), rank=8))


def test_recovery_baselines_rank_real_elements(corpus_texts):
    tasks = recovery_tasks([str(i) for i in range(len(corpus_texts))], corpus_texts, 20, seed=1)
    assert len({(t.name, t.hidden) for t in tasks}) == 20 and all(t.hidden not in t.others for t in tasks)
    rocksalt = text_format.serialize_structure(Structure.from_spacegroup(
        "Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]))
    chloride, sodium = RecoveryTask("NaCl", rocksalt, "Cl"), RecoveryTask("NaCl", rocksalt, "Na")
    # Oxygen is in more corpus crystals than any other element; Cl- and Na+ are common, charge-balanced species.
    frequency = frequency_scores(data.load_texts("data/pretraining-corpus.csv.gz")["text"])
    assert rank_of("O", frequency, []) == 1
    assert rank_of("Cl", data_mined_scores(chloride), ["Na"]) <= 5
    assert rank_of("Na", data_mined_scores(sodium), ["Cl"]) <= 5
