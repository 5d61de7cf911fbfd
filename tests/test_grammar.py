import pytest
import torch
from pymatgen.core import Composition
from transformers import LogitsProcessorList

from crystallm import data
from crystallm.configuration import CrystaLLMConfig
from crystallm.generation.grammar import CrystalGrammarLogitsProcessor
from crystallm.io import text_format
from crystallm.modeling import CrystaLLMForCausalLM
from crystallm.tokenization import CrystaLLMTokenizer


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
