import pytest
import torch

from crystallm import data
from crystallm.configuration import CrystaLLMConfig
from crystallm.errors import CrystaLLMInputError
from crystallm.generation.prompt import Prompt
from crystallm.generation.refinement import refine_texts, slot_values, value_slots, with_values
from crystallm.generation.sampling import generate_structures
from crystallm.io import text_format
from crystallm.modeling import COORDINATE, CrystaLLMForCausalLM, load_model
from crystallm.tokenization import CrystaLLMTokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return CrystaLLMTokenizer.from_format()


@pytest.fixture(scope="module")
def texts():
    return data.load_texts("data/test-sets.csv.gz")["text"][::700]


@pytest.fixture(scope="module")
def model_with_head(tokenizer):
    torch.manual_seed(0)
    config = CrystaLLMConfig(vocab_size=len(tokenizer), n_layer=1, n_embd=32, n_head=2, n_positions=256,
                             refiner={"width": 16, "layers": 1, "heads": 2})
    return CrystaLLMForCausalLM(config).eval()


def test_slots_are_exactly_the_free_values_of_real_texts(tokenizer, texts):
    for text in texts:
        crystal = text_format.read_crystal_text(text)
        slots = value_slots(tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"]))
        free_coordinates = sum(len(site.wyckoff.free_axes) for site in crystal.sites)
        assert sum(slot.kind == COORDINATE for slot in slots) == free_coordinates, text
        # Writing the values back changes nothing: the slots address the right numbers.
        same = with_values(crystal, slots, slot_values(crystal, slots))
        assert text_format.format_crystal_text(same) == text


def test_refinement_moves_only_free_values(model_with_head, tokenizer, texts):
    refined = refine_texts(model_with_head, tokenizer, texts, torch.Generator().manual_seed(0))
    moved = 0
    for text, crystal in zip(texts, refined):
        original = text_format.read_crystal_text(text)
        assert crystal.formula == original.formula and crystal.space_group == original.space_group
        assert [(s.element, s.wyckoff.label) for s in crystal.sites] == \
            [(s.element, s.wyckoff.label) for s in original.sites]
        moved += crystal != original
        text_format.crystal_text_to_structure(crystal)  # still a structure
    assert moved > 0  # an untrained head does move values


def test_the_head_is_saved_and_loaded_with_the_model(model_with_head, tmp_path):
    model_with_head.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    for (name, a), (_, b) in zip(model_with_head.refiner.state_dict().items(), loaded.refiner.state_dict().items()):
        assert torch.equal(a, b), name


def test_generate_refines_when_the_model_has_a_head_and_can_symmetrize(model_with_head, tokenizer):
    kwargs = dict(num=4, batch_size=4, seed=2, max_atoms=24)
    plain = list(generate_structures(model_with_head, tokenizer, Prompt.of(formula="SrTiO3"), refine=False, **kwargs))
    refined = list(generate_structures(model_with_head, tokenizer, Prompt.of(formula="SrTiO3"), **kwargs))
    assert [s.text for s in plain] == [s.text for s in refined]  # the same LM samples
    assert all(s.final_text == "" for s in plain) and all(s.final_text for s in refined)
    for sample in refined:
        assert sample.structure.composition.reduced_formula == "SrTiO3"
        assert text_format.parse_structure(sample.final_text).composition.reduced_formula == "SrTiO3"
    snapped = list(generate_structures(model_with_head, tokenizer, Prompt.of(formula="SrTiO3"), refine=False,
                                       symmetrize=True, **kwargs))
    assert all(s.structure.composition.reduced_formula == "SrTiO3" for s in snapped)


def test_refine_needs_a_head(tokenizer):
    model = CrystaLLMForCausalLM(CrystaLLMConfig(vocab_size=len(tokenizer), n_layer=1, n_embd=32, n_head=2))
    with pytest.raises(CrystaLLMInputError, match="no refinement head"):
        next(generate_structures(model, tokenizer, num=1, refine=True))


def test_train_refiner_saves_a_model_with_its_head_and_logs_value_errors(tmp_path, tokenizer):
    import json

    from crystallm.training.refiner import train_refiner

    base = tmp_path / "base"
    CrystaLLMForCausalLM(CrystaLLMConfig(vocab_size=len(tokenizer), n_layer=1, n_embd=32, n_head=2)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    out = train_refiner({"model": str(base), "corpus": "data/pretraining-corpus.csv.gz", "output_dir": str(tmp_path / "r"),
                         "eval_rows": 16, "seed": 0, "refiner": {"width": 16, "layers": 1, "heads": 2},
                         "batch_size": 8, "learning_rate": 1e-3, "max_steps": 4, "eval_every": 2,
                         "sigma_range": [0.05, 4.0], "sigma_start": 1.0, "steps": 2})
    rows = [json.loads(line) for line in (out / "refiner_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and "eval_refined_coordinate" in rows[1]
    loaded = load_model(out)
    assert loaded.refiner is not None and loaded.config.refiner["width"] == 16
    base_weights = load_model(base).state_dict()
    assert all(torch.equal(base_weights[k], v) for k, v in loaded.state_dict().items() if not k.startswith("refiner."))
