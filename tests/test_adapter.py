import warnings

import pytest
import torch
from peft import PeftModel

from crystallm import cli
from crystallm.adapters import available_adapters, use_adapter
from crystallm.errors import CrystaLLMInputError, CrystaLLMWarning
from crystallm.generation.prompt import Prompt
from crystallm.generation.sampling import generate_structures, load_generator
from crystallm.generation.settings import SamplingSettings
from crystallm.io import text_format
from crystallm.modeling import load_model
from crystallm.tokenization import CrystaLLMTokenizer

PROPERTIES = ("band_gap", "formation_energy_per_atom")


def test_an_adapter_trains_on_a_frozen_base_saves_by_name_and_leaves_the_base_unchanged(model_with_adapters):
    path = model_with_adapters / "adapters" / "band_gap"
    assert (path / "adapter_config.json").exists()
    assert (path / "adapter_model.safetensors").stat().st_size < 200_000  # LoRA: small
    assert available_adapters(model_with_adapters) == list(PROPERTIES)

    tokenizer = CrystaLLMTokenizer.from_pretrained(model_with_adapters)
    model = load_model(model_with_adapters).eval()
    ids = tokenizer(["<prop_1><value_16>data_GaAs"], return_tensors="pt")["input_ids"]
    before = model(ids).logits
    adapted = PeftModel.from_pretrained(model, path, adapter_name="band_gap").eval()
    assert not torch.allclose(adapted(ids).logits, before)  # the adapter changes the model's output
    with adapted.disable_adapter():
        assert torch.equal(adapted(ids).logits, before)  # and the base is untouched under it


@pytest.mark.slow
def test_adapters_switch_by_name_on_one_base_and_unconditioned_samples_stay_the_base_models(model_with_adapters):
    model, tokenizer = load_generator(model_with_adapters, device="cpu")
    base_texts = [s.text for s in generate_structures(model, tokenizer, num=4,
                                                      settings=SamplingSettings(batch_size=2, max_atoms=24))]
    ids = tokenizer(["<prop_1><value_16>data_GaAs"], return_tensors="pt")["input_ids"]

    model = use_adapter(model, "band_gap")
    base = model.get_base_model()
    band_gap_logits = model(ids).logits
    model = use_adapter(model, "formation_energy_per_atom")
    assert model.get_base_model() is base and sorted(model.peft_config) == list(PROPERTIES)  # no reload
    assert model.active_adapter == "formation_energy_per_atom"
    assert not torch.allclose(model(ids).logits, band_gap_logits)
    model = use_adapter(model, "band_gap")  # switching back is set_adapter: the same function as before
    assert torch.equal(model(ids).logits, band_gap_logits)
    # With adapters loaded, prompts without a condition still sample the base model, token for token.
    assert [s.text for s in generate_structures(model, tokenizer, num=4,
                                                settings=SamplingSettings(batch_size=2, max_atoms=24))] == base_texts


@pytest.mark.slow
def test_conditioned_generation_with_and_without_guidance(model_with_adapters):
    model, tokenizer = load_generator(model_with_adapters, device="cpu")
    prompt = Prompt.of(property_name="band_gap", target=2.0)
    with pytest.raises(CrystaLLMInputError, match="no adapter active"):
        list(generate_structures(model, tokenizer, prompt, num=2, settings=SamplingSettings(max_atoms=24)))
    model = use_adapter(model, "band_gap")
    # fp32 both times (bf16 is chosen by a speed probe, which may choose differently under load), and a large scale:
    # this base is untrained, so its conditional and unconditional logits differ by little
    plain = list(generate_structures(model, tokenizer, prompt, num=4,
                                     settings=SamplingSettings(batch_size=2, max_atoms=24, bf16=False)))
    guided = list(generate_structures(model, tokenizer, prompt, num=4,
                                      settings=SamplingSettings(batch_size=2, max_atoms=24, guidance=30.0, bf16=False)))
    for sample in plain + guided:  # the condition is in the prompt, not in the text; every text parses
        assert sample.error == "" and sample.text.startswith("data_")
        text_format.parse_structure(sample.text)
    assert [s.text for s in plain] != [s.text for s in guided]  # guidance changes what is sampled
    with pytest.raises(CrystaLLMInputError, match="condition on formation_energy_per_atom"):
        list(generate_structures(model, tokenizer, Prompt.of(property_name="formation_energy_per_atom", target=-1.0),
                                 num=2, settings=SamplingSettings(max_atoms=24)))
    with pytest.raises(CrystaLLMInputError, match="guidance needs a property target"):
        list(generate_structures(model, tokenizer, num=2, settings=SamplingSettings(max_atoms=24, guidance=2.0)))


def test_an_unknown_adapter_lists_the_available_ones(model_with_adapters):
    model, _ = load_generator(model_with_adapters, device="cpu")
    with pytest.raises(CrystaLLMInputError, match="no adapter 'bulk_modulus'.*available: band_gap, "
                                                  "formation_energy_per_atom"):
        use_adapter(model, "bulk_modulus")


def _generate(model_dir, out, *arguments) -> int:
    return cli.main(["generate", "--model", str(model_dir), "--out", str(out), "--num", "2", "--batch-size", "2",
                     "--max-atoms", "24", "--quiet", *arguments])


@pytest.mark.slow
def test_generate_command_with_an_adapter_a_target_and_guidance(model_with_adapters, tmp_path, capsys):
    import json

    out = tmp_path / "guided"
    assert _generate(model_with_adapters, out, "--adapter", "band_gap", "--target", "2.0", "--guidance", "2") == 0
    settings = json.loads((out / "run.json").read_text())
    assert settings["adapter"] == "band_gap" and settings["sampling"]["guidance"] == 2.0
    assert settings["prompt"] == "band_gap 2.0"
    # Far outside the data: one warning line on stderr naming the command and the range, and the run goes on.
    capsys.readouterr()
    assert _generate(model_with_adapters, tmp_path / "far", "--adapter", "band_gap", "--target", "12") == 0
    warning_lines = [line for line in capsys.readouterr().err.splitlines() if ": warning: " in line]
    assert warning_lines == [
        "crystallm generate: warning: band_gap target 12.0 eV is outside the range the model was conditioned on "
        "[0.0, 8.0) eV; it is treated as the nearest end"]
    # The command's warning format ends with the command: a library call afterwards warns as Python does.
    with pytest.warns(CrystaLLMWarning):
        warnings.warn("after the command", CrystaLLMWarning)
    assert warnings.showwarning.__module__ == "warnings"


@pytest.mark.parametrize("arguments, message", [
    (["--adapter", "bandgap", "--target", "1"], "no adapter 'bandgap' for the model in .*; available: band_gap, "
                                                "formation_energy_per_atom"),
    (["--adapter", "band_gap"], "--adapter and --target go together"),
    (["--guidance", "2"], "--guidance needs a property target"),
    (["--adapter", "band_gap", "--target", "nan"], "band_gap target nan is not a number"),
])
def test_bad_adapter_arguments_are_one_line_and_write_nothing(arguments, message, model_with_adapters, tmp_path,
                                                              capsys):
    import re

    assert _generate(model_with_adapters, tmp_path / "out", *arguments) == 2
    error = capsys.readouterr().err.strip()
    assert re.search(message, error) and len(error.splitlines()) == 1
    assert not (tmp_path / "out" / "samples.jsonl").exists()
