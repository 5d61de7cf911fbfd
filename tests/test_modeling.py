
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from crystallm.configuration import CrystaLLMConfig
from crystallm.errors import CheckpointError
from crystallm.io import text_format
from crystallm.io.cif import structure_from_cif
from crystallm.modeling import CrystaLLMForCausalLM, load_model
from crystallm.tokenization import CrystaLLMTokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return CrystaLLMTokenizer.from_format()


def tiny_model(tokenizer, **objectives) -> CrystaLLMForCausalLM:
    torch.manual_seed(0)
    config = CrystaLLMConfig(vocab_size=len(tokenizer), n_layer=2, n_embd=64, n_head=4, n_positions=256, **objectives)
    return CrystaLLMForCausalLM(config)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("model")
    tiny_model(tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_auto_classes_load_and_generate_from_a_formula_prompt(saved):
    tokenizer = AutoTokenizer.from_pretrained(saved)
    model = AutoModelForCausalLM.from_pretrained(saved)
    assert type(model) is CrystaLLMForCausalLM
    prompts = tokenizer(["data_NaCl", "data_Ga2Te3"], return_tensors="pt", padding=True)
    torch.manual_seed(0)
    out = model.generate(**prompts, max_new_tokens=60, do_sample=True, top_k=20,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    assert out.shape[0] == 2 and out.shape[1] > prompts["input_ids"].shape[1]
    assert tokenizer.decode(out[1], skip_special_tokens=True).startswith("data_Ga2Te3")


def test_save_load_gives_identical_logits(saved, tokenizer):
    model = load_model(str(saved))
    reloaded = AutoModelForCausalLM.from_pretrained(saved)
    ids = tokenizer(["data_NaCl\n_space_group_name_H-M_alt Fm-3m"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)  # tied


def test_bidirectional_pass_sees_later_tokens(tokenizer):
    model = tiny_model(tokenizer).eval()
    ids = torch.tensor([[1, 87, 523, 529, 2]])
    changed = ids.clone()
    changed[0, -1] = 88
    with torch.no_grad():
        causal = model.encode(ids), model.encode(changed)
        bidirectional = model.encode(ids, bidirectional=True), model.encode(changed, bidirectional=True)
    assert torch.allclose(causal[0][0, 0], causal[1][0, 0])  # the first token cannot see the last
    assert not torch.allclose(bidirectional[0][0, 0], bidirectional[1][0, 0])


def test_objectives_switch_on_and_off_and_train(tokenizer, mp20_test_slice):
    texts = [text_format.serialize_structure(structure_from_cif(r["cif"])) for r in mp20_test_slice[:8]]
    batch = tokenizer([t + tokenizer.eos_token for t in texts], return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    masked, labels = ids.clone(), torch.full_like(ids, -100)
    elements = torch.tensor([token.startswith("\n") and token[1:2].isupper()
                             for token in tokenizer.convert_ids_to_tokens(range(len(tokenizer)))])
    at = elements[ids] & (mask == 1)
    masked[at], labels[at] = tokenizer.mask_token_id, ids[at]
    view = ids.flip(0)[torch.arange(8).flip(0)]  # the same sequences: a trivial positive pair
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": ids, "masked_input_ids": masked,
              "masked_labels": labels, "view_input_ids": view, "view_attention_mask": mask}
    clm_only = tiny_model(tokenizer)(**inputs)
    assert clm_only.masked_atom_loss is None and clm_only.contrastive_loss is None
    assert torch.equal(clm_only.loss, clm_only.clm_loss)
    model = tiny_model(tokenizer, masked_atom_weight=1.0, contrastive_weight=0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(15):
        out = model(**inputs)
        losses = {"clm": out.clm_loss, "masked_atom": out.masked_atom_loss, "contrastive": out.contrastive_loss}
        assert torch.allclose(out.loss, losses["clm"] + losses["masked_atom"] + 0.5 * losses["contrastive"])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        first = first or {k: v.item() for k, v in losses.items()}
    assert losses["clm"].item() < first["clm"] and losses["masked_atom"].item() < first["masked_atom"]


def test_corrupt_or_mismatched_checkpoint_is_refused(saved, tmp_path, tokenizer):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for file in saved.iterdir():
        (corrupt / file.name).write_bytes(file.read_bytes())
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cannot load the checkpoint"):
        load_model(str(corrupt))
    mismatched = tmp_path / "mismatched"
    tiny_model(tokenizer).save_pretrained(mismatched)
    config = CrystaLLMConfig.from_pretrained(mismatched)
    config.n_layer = 3
    config.save_pretrained(mismatched)
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_model(str(mismatched))
    with pytest.raises(CheckpointError, match="cannot load"):
        load_model(str(tmp_path / "nowhere"))
