"""Shared fixtures: small seeded slices of the real data in ../shared/data."""

import dataclasses
import random
import shutil
import warnings

import pytest
import torch

from crystallm import data
from crystallm.configuration import CrystaLLMConfig
from crystallm.io import text_format
from crystallm.io.cif import structure_from_cif
from crystallm.model_folder import TRAINING_CORPUS
from crystallm.modeling import CrystaLLMForCausalLM
from crystallm.tokenization import CrystaLLMTokenizer
from crystallm.training.adapter import train_adapter, train_pattern_adapter
from crystallm.training.settings import AdapterSettings

warnings.filterwarnings("ignore", module="pymatgen")


@pytest.fixture(scope="session")
def real_slice() -> list[tuple[str, str, str]]:
    """(id, source, cif): 5 seeded rows of every source file in ../shared/data."""
    rows = []
    for name in data.SOURCES:
        dataset = data.load_source(name)
        for index in random.Random(name).sample(range(dataset.num_rows), 5):
            row = dataset[index]
            rows.append((row["id"], name, row["cif"]))
    return rows


@pytest.fixture(scope="session")
def mp20_test_slice():
    """40 seeded rows of the mp20-bt test split, as dicts with id, cif, properties."""
    dataset = data.load_split("mp20-bt", "test")
    return [dataset[i] for i in random.Random(7).sample(range(dataset.num_rows), 40)]


@pytest.fixture(scope="session")
def nacl_cif() -> str:
    from pymatgen.core import Lattice, Structure

    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]).to(
        fmt="cif")


@pytest.fixture(scope="session")
def nacl_text(nacl_cif) -> str:
    return text_format.serialize_structure(structure_from_cif(nacl_cif))


def _save_tiny_model(directory):
    """An untrained 1-layer model (32 wide, 256 positions) and the tokenizer, saved as a user's model folder."""
    tokenizer = CrystaLLMTokenizer.from_format()
    torch.manual_seed(0)
    config = CrystaLLMConfig(vocab_size=len(tokenizer), n_layer=1, n_embd=32, n_head=2, n_positions=256)
    CrystaLLMForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """An untrained 1-layer model saved as a user's model folder (model + tokenizer)."""
    return _save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def model_with_adapters(tmp_path_factory):
    """A tiny untrained base model folder with two adapters trained 3 steps each on real corpus rows, saved
    beside it (`<model>/adapters/<property>/`) as the shipped model keeps them, and the corpus it stands for."""
    base = _save_tiny_model(tmp_path_factory.mktemp("model-with-adapters"))
    for name in ("band_gap", "formation_energy_per_atom"):
        train_adapter(AdapterSettings(model=str(base), property=name, corpus="data/pretraining-corpus.csv.gz",
                                      output_dir=str(base / "adapters"), batch_size=8, learning_rate=1e-2,
                                      max_steps=3, rank=4))
    shutil.copy("data/pretraining-corpus.csv.gz", base / TRAINING_CORPUS)  # its novelty reference, as exported
    return base


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each test's training loop sets up accelerate as a fresh process would (its state is a process singleton)."""
    yield
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()


@pytest.fixture(scope="session")
def model_with_pattern_adapter(tmp_path_factory):
    """A tiny untrained base model folder with the powder-pattern adapter (3 steps on 64 real corpus rows) and a
    band-gap adapter beside it."""
    base = _save_tiny_model(tmp_path_factory.mktemp("model-with-pattern-adapter"))
    common = AdapterSettings(model=str(base), corpus="data/pretraining-corpus.csv.gz",
                             output_dir=str(base / "adapters"), batch_size=8, learning_rate=1e-2, max_steps=3, rank=4)
    train_pattern_adapter(dataclasses.replace(common, max_rows=64))
    train_adapter(dataclasses.replace(common, property="band_gap"))
    return base
