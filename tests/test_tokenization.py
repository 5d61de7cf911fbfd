from pathlib import Path

import pytest
from transformers import AutoTokenizer

from crystallm.io import text_format
from crystallm.io.cif import structure_from_cif
from crystallm.tokenization import PROPERTY_TOKENS, VALUE_TOKENS, CrystaLLMTokenizer

COMMITTED = Path(__file__).resolve().parents[1] / "tokenizer" / "crystallm-tokenizer"


@pytest.fixture(scope="module")
def tokenizer():
    return CrystaLLMTokenizer.from_format()


def test_exact_text_round_trip_without_unknowns(tokenizer, real_slice):
    for row_id, source, cif in real_slice:
        text = text_format.serialize_structure(structure_from_cif(cif))
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids, (source, row_id)
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        assert ids[0] == tokenizer.bos_token_id


def test_tokens_are_the_format_lexemes(tokenizer, nacl_text):
    ids = tokenizer(nacl_text, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == text_format.split_lexemes(nacl_text)
    assert len(ids) == 21  # data_ Na Cl, 2 tags + values, a = "5." "64", loop header, 2 rows of 5


def test_space_group_symbols_are_not_element_tokens(tokenizer):
    group = tokenizer.convert_tokens_to_ids(" Pm")
    elements = tokenizer.convert_tokens_to_ids(["Pm", "\nPm"])
    assert tokenizer.unk_token_id not in (group, *elements)
    assert group not in elements


def test_auto_tokenizer_loads_committed_files_equal_to_the_format(tokenizer, real_slice):
    loaded = AutoTokenizer.from_pretrained(COMMITTED)
    assert type(loaded) is CrystaLLMTokenizer
    assert loaded.get_vocab() == tokenizer.get_vocab(), "re-run tokenizer/build_tokenizer.py"
    assert loaded.padding_side == "left"
    for _, _, cif in real_slice[:20]:
        text = text_format.serialize_structure(structure_from_cif(cif))
        ids = loaded(text)["input_ids"]
        assert ids == tokenizer(text)["input_ids"]
        assert loaded.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_files_of_another_format_are_refused(tmp_path):
    import json

    CrystaLLMTokenizer.from_format().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["format_version"] = "0"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="written for text format version 0"):
        AutoTokenizer.from_pretrained(tmp_path)


def test_special_and_reserved_tokens(tokenizer):
    for token in (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.mask_token,
                  *PROPERTY_TOKENS, *VALUE_TOKENS, "<prop_none>"):
        assert tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id
    batch = tokenizer(["data_NaCl", "data_GaTe\n_space_group_name_H-M_alt P6_3/mmc"], padding=True)
    assert batch["input_ids"][0][0] == tokenizer.pad_token_id  # left padding for batched generation


def test_unknown_characters_become_unk(tokenizer):
    ids = tokenizer("data_NaCl%", add_special_tokens=False)["input_ids"]
    assert ids[-1] == tokenizer.unk_token_id
