import pytest
import torch

from crystallm.configuration import CrystaLLMConfig
from crystallm.errors import CrystaLLMInputError
from crystallm.generation.conditioning import CONDITIONS, check_target, condition_for, condition_prefix
from crystallm.generation.grammar import CrystalGrammarLogitsProcessor
from crystallm.generation.prompt import Prompt
from crystallm.io import text_format
from crystallm.modeling import CrystaLLMForCausalLM
from crystallm.tokenization import CrystaLLMTokenizer


def test_values_map_to_bins_whose_centers_are_within_half_a_bin():
    for condition in CONDITIONS.values():
        for value in (condition.low, (condition.low + condition.high) / 2, condition.high - 1e-9):
            center = condition.bin_center(condition.value_bin(value))
            assert abs(center - value) <= condition.bin_width / 2 + 1e-9


def test_a_conditioned_prompt_is_two_tokens_and_the_grammar_reads_past_them():
    tokenizer = CrystaLLMTokenizer.from_format()
    prefix = condition_prefix("band_gap", 1.5)
    ids = tokenizer(prefix + Prompt.of(formula="GaAs").text())["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids[1:3]) == ["<prop_1>", "<value_12>"]
    processor = CrystalGrammarLogitsProcessor(tokenizer)
    assert processor.state_of(ids).error is None
    torch.manual_seed(0)
    model = CrystaLLMForCausalLM(CrystaLLMConfig(vocab_size=len(tokenizer), n_layer=1, n_embd=32, n_head=2)).eval()
    from transformers import LogitsProcessorList

    out = model.generate(**tokenizer([prefix + "data_"], return_tensors="pt"), max_new_tokens=300, do_sample=True,
                         logits_processor=LogitsProcessorList([CrystalGrammarLogitsProcessor(tokenizer, 24)]),
                         pad_token_id=0, eos_token_id=2)
    text_format.parse_structure(tokenizer.decode(out[0], skip_special_tokens=True))


def test_targets_outside_the_range_warn_and_unknown_properties_list_the_known():
    with pytest.warns(UserWarning, match=r"outside the range .*\[0.0, 8.0\) eV"):
        check_target("band_gap", 12.0)
    with pytest.raises(CrystaLLMInputError, match="conditionable properties: formation_energy_per_atom, band_gap"):
        condition_for("bandgap")


def test_a_prompt_carries_its_property_condition_and_checks_it():
    prompt = Prompt.of(formula="GaAs", property_name="band_gap", target=1.5)
    assert prompt.text().startswith("<prop_1><value_12>data_GaAs")
    assert Prompt.of(property_name="band_gap").text() == "<prop_1><prop_none>data_"  # guidance's other branch
    with pytest.raises(CrystaLLMInputError, match="unknown property 'bandgap'"):
        Prompt.of(property_name="bandgap", target=1.0)
