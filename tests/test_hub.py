"""The Hub round trip with the real `huggingface_hub` client, run as users run it (the `crystallm` command and a
Python process with HF_ENDPOINT, HF_TOKEN, HF_HOME set), against a Hub-compatible server process on loopback
(tests/hub_server.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crystallm.adapters import use_adapter
from crystallm.generation.sampling import load_generator

pytestmark = pytest.mark.slow  # a server process and a push per module

TOKEN = "hf_test_token"
PROBE = """
import json, sys, torch
import crystallm
from transformers import AutoModelForCausalLM
from crystallm.adapters import use_adapter
from crystallm.generation.sampling import load_generator
repo, out = sys.argv[1], sys.argv[2]
model, tokenizer = load_generator(repo, device="cpu")
ids = tokenizer(["<prop_1><value_16>data_GaAs"], return_tensors="pt")["input_ids"]
logits = {"base": model(ids).logits}
model = use_adapter(model, "band_gap"); logits["band_gap"] = model(ids).logits
model = use_adapter(model, "formation_energy_per_atom"); logits["formation_energy_per_atom"] = model(ids).logits
auto = AutoModelForCausalLM.from_pretrained(repo)  # no trust_remote_code: the class is registered by the import
logits["auto"] = auto(ids).logits
torch.save(logits, out)
"""


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A running server; yields a function that runs a command as a user of it (env set, cache in `home`)."""
    root = tmp_path_factory.mktemp("hub-store")
    server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("hub_server.py")), str(root), TOKEN],
                              stdout=subprocess.PIPE, text=True)
    endpoint = f"http://127.0.0.1:{server.stdout.readline().strip()}"

    def run(arguments: list[str], home: Path, token: str | None = TOKEN, offline: bool = False):
        env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
        env |= {"HF_ENDPOINT": endpoint, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1"}
        env |= {"HF_TOKEN": token} if token else {}
        env |= {"HF_HUB_OFFLINE": "1"} if offline else {}
        return subprocess.run(arguments, env=env, capture_output=True, text=True, timeout=300)

    run.root = root
    yield run
    server.kill()
    server.wait()


def _crystallm(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "crystallm.cli", *arguments]


@pytest.fixture(scope="module")
def pushed(hub, model_with_adapters, tmp_path_factory):
    """The tiny model with two adapters pushed to user/tiny-crystallm; the pushing user's cache folder."""
    home = tmp_path_factory.mktemp("hf-home")
    result = hub(_crystallm("push", str(model_with_adapters), "user/tiny-crystallm", "--private"), home)
    assert result.returncode == 0, result.stderr
    assert "pushed" in result.stdout and "user/tiny-crystallm" in result.stdout
    return home


def test_push_then_load_by_hub_id_gives_identical_logits_for_the_base_and_both_adapters(hub, pushed,
                                                                                       model_with_adapters, tmp_path):
    files = sorted(str(p.relative_to(hub.root / "user/tiny-crystallm/files"))
                   for p in (hub.root / "user/tiny-crystallm/files").rglob("*") if p.is_file())
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json",
            "adapters/band_gap/adapter_model.safetensors",
            "adapters/formation_energy_per_atom/adapter_config.json"} <= set(files)
    from huggingface_hub import ModelCard

    card = ModelCard((hub.root / "user/tiny-crystallm/files/README.md").read_text())
    assert card.data.license == "mit" and "crystallm" in card.data.tags and "## Property adapters" in card.text
    assert card.text.count("| band_gap |") == 1  # one row per adapter, with its surrogate's held-out MAE

    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    result = hub([sys.executable, str(probe), "user/tiny-crystallm", str(tmp_path / "logits.pt")], pushed)
    assert result.returncode == 0, result.stderr
    remote = torch.load(tmp_path / "logits.pt")

    model, tokenizer = load_generator(model_with_adapters, device="cpu")
    ids = tokenizer(["<prop_1><value_16>data_GaAs"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        local = {"base": model(ids).logits}
        model = use_adapter(model, "band_gap")
        local["band_gap"] = model(ids).logits
        model = use_adapter(model, "formation_energy_per_atom")
        local["formation_energy_per_atom"] = model(ids).logits
    for name, logits in local.items():
        assert torch.equal(remote[name], logits), name
    assert torch.equal(remote["auto"], local["base"])
    assert not torch.equal(local["band_gap"], local["base"])  # the adapters really differ from the base


def test_offline_generation_from_a_warm_cache_and_a_clear_error_from_a_cold_one(hub, pushed, tmp_path):
    out = tmp_path / "offline-run"
    warm = hub(_crystallm("generate", "--model", "user/tiny-crystallm", "--num", "2", "--max-atoms", "24",
                          "--out", str(out), "--quiet"), pushed, offline=True)
    assert warm.returncode == 0, warm.stderr
    assert json.loads((out / "summary.json").read_text())["entries"] == 2
    cold = hub(_crystallm("generate", "--model", "user/tiny-crystallm", "--num", "2", "--out", str(tmp_path / "c"),
                          "--quiet"), tmp_path / "empty-home", offline=True)
    assert cold.returncode == 2
    assert cold.stderr.strip().splitlines() == [
        f"crystallm generate: error: user/tiny-crystallm: not in the Hugging Face cache "
        f"({tmp_path / 'empty-home' / 'hub'}) and HF_HUB_OFFLINE is set; download it once online (crystallm generate "
        f"--model user/tiny-crystallm) or give a local folder"]


def test_bad_hub_input_gives_one_clear_line(hub, model_with_adapters, tmp_path):
    from transformers import GPT2Config

    home = tmp_path / "home"
    missing = hub(_crystallm("generate", "--model", "user/no-such-model", "--out", str(tmp_path / "a")), home)
    assert missing.returncode == 2 and "user/no-such-model: no such repository on http://127.0.0.1:" in missing.stderr
    no_token = hub(_crystallm("push", str(model_with_adapters), "user/other"), home, token=None)
    assert no_token.returncode == 2
    assert "no Hugging Face token: log in with `hf auth login` or set HF_TOKEN" in no_token.stderr
    unknown = hub(_crystallm("push", str(model_with_adapters), "user/other", "--adapters", "bulk_modulus"), home)
    assert unknown.returncode == 2 and "available: band_gap, formation_energy_per_atom" in unknown.stderr
    # A repository that holds another kind of model (GPT-2), pushed with the plain client:
    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=1).save_pretrained(gpt2)
    upload = ("from huggingface_hub import HfApi; api = HfApi(); api.create_repo('user/gpt2'); "
              f"api.upload_folder(repo_id='user/gpt2', folder_path={str(gpt2)!r})")
    assert hub([sys.executable, "-c", upload], home).returncode == 0
    other = hub(_crystallm("generate", "--model", "user/gpt2", "--out", str(tmp_path / "b")), home)
    assert other.returncode == 2 and "not a crystallm model (its config.json says model_type 'gpt2')" in other.stderr


class _WritesAFileWhenUnpickled:
    """What a malicious surrogate could hold: unpickling it calls `open(marker, "w")`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_hub_model_whose_surrogate_is_a_pickle_is_refused_and_the_pickle_never_runs(hub, model_with_adapters,
                                                                                     tmp_path):
    import pickle
    import shutil

    folder = tmp_path / "evil"
    shutil.copytree(model_with_adapters, folder, ignore=shutil.ignore_patterns("surrogates"))
    marker = tmp_path / "written-by-the-pickle"
    (folder / "surrogates" / "band_gap").mkdir(parents=True)
    (folder / "surrogates" / "band_gap" / "predictor.joblib").write_bytes(
        pickle.dumps(_WritesAFileWhenUnpickled(marker)))
    (folder / "surrogates" / "band_gap" / "report.json").write_text('{"property": "band_gap"}')
    home = tmp_path / "home"
    upload = ("from huggingface_hub import HfApi; api = HfApi(); api.create_repo('user/evil'); "
              f"api.upload_folder(repo_id='user/evil', folder_path={str(folder)!r})")
    assert hub([sys.executable, "-c", upload], home).returncode == 0
    result = hub(_crystallm("design", "--model", "user/evil", "--target", "band_gap=2", "--num", "4",
                            "--out", str(tmp_path / "d")), home)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "the surrogate is a pickle (predictor.joblib), which runs code when loaded" in result.stderr
    assert not marker.exists() and not (tmp_path / "d").exists()
    # The check itself can see a pickle run: loading the file with pickle writes the marker.
    pickle.loads((folder / "surrogates" / "band_gap" / "predictor.joblib").read_bytes())
    assert marker.exists()
