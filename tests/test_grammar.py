import pytest
import torch
from pymatgen.core import Composition
from transformers import LogitsProcessorList

from crystallm import data
from crystallm.configuration import CrystaLLMConfig
from crystallm.generation.distances import DistanceFloor
from crystallm.generation.grammar import CrystalGrammarLogitsProcessor
from crystallm.generation.prompt import Prompt
from crystallm.generation.sampling import generate_structures
from crystallm.generation.settings import SamplingSettings
from crystallm.io import text_format
from crystallm.modeling import CrystaLLMForCausalLM
from crystallm.tokenization import CrystaLLMTokenizer
from crystallm.validity import compositional_validity, structural_validity


@pytest.fixture(scope="module")
def tokenizer():
    return CrystaLLMTokenizer.from_format()


@pytest.fixture(scope="module")
def untrained(tokenizer):
    torch.manual_seed(0)
    config = CrystaLLMConfig(vocab_size=len(tokenizer), n_layer=1, n_embd=32, n_head=2, n_positions=512)
    return CrystaLLMForCausalLM(config).eval()


def sample(model, tokenizer, prompts, grammar: bool, max_atoms: int = 24) -> list[str]:
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    processors = LogitsProcessorList([CrystalGrammarLogitsProcessor(tokenizer, max_atoms)]) if grammar else None
    out = model.generate(**inputs, max_new_tokens=8 * max_atoms + 60, do_sample=True, top_k=0,
                         logits_processor=processors, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in out]


def parses(text: str) -> bool:
    try:
        text_format.parse_structure(text)
        return True
    except text_format.MalformedTextError:
        return False


def test_every_real_text_is_accepted(tokenizer):
    processor = CrystalGrammarLogitsProcessor(tokenizer, max_atoms=256)
    texts = data.load_texts("data/test-sets.csv.gz")["text"][::400]
    for text in texts:
        state = processor.state_of(tokenizer(text + tokenizer.eos_token)["input_ids"])
        assert state.error is None and state.stage == "done", (text, state.error)


def test_untrained_model_writes_only_parseable_text_with_the_grammar(untrained, tokenizer):
    torch.manual_seed(1)
    texts = sample(untrained, tokenizer, ["data_"] * 32, grammar=True)
    assert all(parses(text) for text in texts)
    torch.manual_seed(1)
    assert not all(parses(text) for text in sample(untrained, tokenizer, ["data_"] * 8, grammar=False))


def test_multiplicities_add_up_to_the_prompted_formula(untrained, tokenizer):
    formulas = ["NaCl", "Ga2Te3", "LiFePO4", "SrTiO3"]
    prompts = [f"data_{f}\n{text_format.TAG_SPACE_GROUP}" for f in formulas]
    torch.manual_seed(2)
    for formula, text in zip(formulas, sample(untrained, tokenizer, prompts, grammar=True)):
        structure = text_format.parse_structure(text)
        assert structure.composition.reduced_composition == Composition(formula).reduced_composition
        assert text_format.read_crystal_text(text).formula == text_format.parse_formula(formula)


def test_a_prompt_outside_the_format_is_refused(tokenizer):
    processor = CrystalGrammarLogitsProcessor(tokenizer)
    ids = torch.tensor([tokenizer("data_NaCl\n_cell_length_a 4.20")["input_ids"]])
    with pytest.raises(ValueError, match="does not follow the text format"):
        processor(ids, torch.zeros(1, len(tokenizer)))


def _allowed_after(processor, tokenizer, text: str) -> list[str]:
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    allowed = processor(ids, torch.zeros(1, len(tokenizer)))[0] > -1e9
    return tokenizer.convert_ids_to_tokens(allowed.nonzero().flatten())


def _rows_so_far(formula: str, group: str, a: float, rows: list[str]) -> str:
    return (f"data_{formula}\n{text_format.TAG_SPACE_GROUP} {group}\n{text_format.TAG_FORMULA_UNITS} 1\n"
            f"_cell_length_a {a:.2f}\n{text_format.LOOP_HEADER}\n" + "\n".join(rows) + "\n")


def test_wyckoff_positions_whose_orbit_comes_too_close_are_masked(tokenizer):
    # Pm-3m, a = 1 Å, Na on 1a (the corner): Cl3 fits 3c (face centres, 0.71 Å from Na) or 3d (edge centres,
    # 0.50 Å from Na). A floor of 0.4 Å leaves both; 0.6 Å only 3c; 0.8 Å neither, so the least close (3c) is
    # allowed and the fallback counted.
    text = _rows_so_far("NaCl3", "Pm-3m", 1.0, ["Na 1a . . ."]) + "Cl"
    offered = {floor: _allowed_after(CrystalGrammarLogitsProcessor(tokenizer, floor=DistanceFloor(floor)),
                                     tokenizer, text) for floor in (0.4, 0.6)}
    assert offered == {0.4: [" 3c", " 3d"], 0.6: [" 3c"]}
    strict = CrystalGrammarLogitsProcessor(tokenizer, floor=DistanceFloor(0.8))
    assert _allowed_after(strict, tokenizer, text) == [" 3c"] and strict.fallbacks(0) == 1
    assert _allowed_after(CrystalGrammarLogitsProcessor(tokenizer), tokenizer, text) == [" 3c", " 3d"]  # no floor


def test_coordinates_that_bring_an_orbit_too_close_are_masked(tokenizer):
    # Pm-3m, a = 4 Å, Na at the corner, Cl on 6e (x, 0, 0): x < 0.125 puts Cl within 0.5 Å of Na, x within
    # 0.0625 of 1/2 within 0.5 Å of its own mirror image (1 - x, 0, 0); x and 1 - x are the same orbit.
    processor = CrystalGrammarLogitsProcessor(tokenizer, floor=DistanceFloor(0.5))
    first = _allowed_after(processor, tokenizer, _rows_so_far("NaCl6", "Pm-3m", 4.0, ["Na 1a . . ."]) + "Cl 6e")
    chunks = {int(token[-2:]) for token in first}
    assert set(range(13, 43)) | set(range(57, 87)) <= chunks
    assert not chunks & (set(range(12)) | set(range(44, 56)) | set(range(88, 100)))
    # The second chunk is measured exactly: 0.12|50 is 0.5 Å from Na, 0.12|49 closer.
    second = _allowed_after(processor, tokenizer, _rows_so_far("NaCl6", "Pm-3m", 4.0, ["Na 1a . . ."]) + "Cl 6e 0.12")
    assert "49" not in second and "50" in second and "99" in second


def test_every_structure_of_an_untrained_model_keeps_atoms_apart(untrained, tokenizer):
    samples = list(generate_structures(untrained, tokenizer, num=48,
                                       settings=SamplingSettings(batch_size=16, seed=0, max_atoms=20)))
    assert all(s.structure is not None and structural_validity(s.structure) for s in samples)
    assert all(s.fallbacks == 0 for s in samples)  # the few dead ends were drawn again
    settings = SamplingSettings(batch_size=16, seed=0, max_atoms=20, min_distance=0.0)
    unguarded = list(generate_structures(untrained, tokenizer, num=48, settings=settings))
    assert sum(not structural_validity(s.structure) for s in unguarded) >= 3  # what the floor prevents


def test_charge_neutral_formulas_when_asked(untrained, tokenizer):
    prompts = [Prompt.of(chemical_system=system) for system in ("Na-Cl", "Li-Fe-O", "Ba-Ti-O", "Ga-As")] * 4
    settings = SamplingSettings(batch_size=16, seed=0, max_atoms=24, charge_neutral=True)
    samples = list(generate_structures(untrained, tokenizer, prompts, settings=settings))
    neutral = [compositional_validity(s.structure.composition) for s in samples]
    # A formula whose earlier counts leave no neutral ending (Ba4Ti4O_n within 24 atoms) is drawn again, and
    # kept with its fallback counted if every redraw ends the same way.
    assert all(ok or s.fallbacks for ok, s in zip(neutral, samples))
    unguarded = list(generate_structures(untrained, tokenizer, prompts,
                                         settings=SamplingSettings(batch_size=16, seed=0, max_atoms=24)))
    assert sum(neutral) >= sum(compositional_validity(s.structure.composition) for s in unguarded) + 4
