import torch
from peft import PeftModel

from crystallm.configuration import CrystaLLMConfig
from crystallm.modeling import CrystaLLMForCausalLM, load_model
from crystallm.tokenization import CrystaLLMTokenizer
from crystallm.training import train_adapter


def test_an_adapter_trains_on_a_frozen_base_saves_by_name_and_leaves_the_base_unchanged(tmp_path):
    tokenizer = CrystaLLMTokenizer.from_format()
    torch.manual_seed(0)
    base = tmp_path / "base"
    CrystaLLMForCausalLM(CrystaLLMConfig(vocab_size=len(tokenizer), n_layer=1, n_embd=32, n_head=2)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    path = train_adapter({"model": str(base), "property": "band_gap", "corpus": "data/pretraining-corpus.csv.gz",
                          "output_dir": str(tmp_path / "adapters"), "batch_size": 8, "learning_rate": 1e-2,
                          "max_steps": 3, "rank": 4})
    assert path == tmp_path / "adapters" / "band_gap" and (path / "adapter_config.json").exists()
    assert (path / "adapter_model.safetensors").stat().st_size < 200_000  # LoRA: small

    model = load_model(base).eval()
    ids = tokenizer(["<prop_1><value_16>data_GaAs"], return_tensors="pt")["input_ids"]
    before = model(ids).logits
    adapted = PeftModel.from_pretrained(model, path, adapter_name="band_gap").eval()
    assert not torch.allclose(adapted(ids).logits, before)  # the adapter changes the model's output
    with adapted.disable_adapter():
        assert torch.equal(adapted(ids).logits, before)  # and the base is untouched under it
