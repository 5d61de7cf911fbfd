"""The Hugging Face Hub: push a model folder (weights, config, tokenizer, refinement head, property adapters,
surrogate predictors, a generated model card) and load one by its Hub id. `huggingface_hub` does the work.

Layout on the Hub = layout on disk: one repository per model, adapters in `adapters/<property>/` (PEFT's layout
for a named adapter) and surrogates in `surrogates/<property>/`, so a downloaded snapshot is a model folder like
any other and every function that takes a folder takes a Hub id. One repository keeps a base and the adapters
trained on it together: an adapter only works on the base it was trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

from crystallm.adapters import ADAPTERS_FOLDER, available_adapters
from crystallm.errors import CrystaLLMInputError
from crystallm.model_card import MODEL_FILES
from crystallm.model_folder import REPO_ID, TRAINING_CORPUS, check_model_folder
from crystallm.properties.surrogates import PREDICTOR_FILE, REPORT_FILE

DATA_LICENSE = ("Training data: Materials Project (CC BY 4.0), AFLOW, WBM (CC BY 4.0), Perov-5, Carbon-24 and "
                "MPTS-52, as recovered in ../shared/data (each folder's README gives source and license).")


def files_to_push(folder: Path, adapters: list[str] | None = None) -> list[str]:
    """Paths (relative to `folder`) that a push uploads: the model files and training corpus, and the adapters
    asked for (default: all) with the surrogates of their properties. An unknown adapter lists the available ones.

    >>> from crystallm.model_folder import DEFAULT_MODEL
    >>> files_to_push(Path(DEFAULT_MODEL), ["band_gap"])[-4:]
    ['adapters/band_gap/adapter_config.json', 'adapters/band_gap/adapter_model.safetensors', \
'surrogates/band_gap/predictor.skops', 'surrogates/band_gap/report.json']
    """
    available = available_adapters(folder)
    chosen = available if adapters is None else adapters
    unknown = [name for name in chosen if name not in available]
    if unknown:
        raise CrystaLLMInputError(f"no adapter {unknown[0]!r} in {folder}; available: "
                                  f"{', '.join(available) or 'none'}")
    files = [name for name in (*MODEL_FILES, TRAINING_CORPUS) if (folder / name).exists()]
    for name in chosen:
        files += sorted(str(p.relative_to(folder)) for p in (folder / ADAPTERS_FOLDER / name).glob("*") if p.is_file())
        # A surrogate travels as skops and its report only: a pickle beside them would run code where it lands.
        files += [f"surrogates/{name}/{file}" for file in (PREDICTOR_FILE, REPORT_FILE)
                  if (folder / "surrogates" / name / file).exists()]
    return files


def push_to_hub(model: str | Path, repo_id: str, private: bool = False, adapters: list[str] | None = None,
                token: str | None = None, commit_message: str = "Upload crystallm model") -> str:
    """Push a model folder to the Hub repository `repo_id` in one commit (created if needed): the model files,
    the adapters asked for (default: all) with their surrogates, and a model card generated from the folder
    (`model_card_for`). Returns the commit's URL.

    Example (needs a token and the network): `push_to_hub("runs/my-model", "me/my-crystallm", private=True)`;
    the command is `crystallm push runs/my-model me/my-crystallm --private`.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    folder = Path(model)
    check_model_folder(folder)
    if not REPO_ID.match(repo_id):
        raise CrystaLLMInputError(f"{repo_id!r} is not a Hub repository id (user/name)")
    token = token or get_token()
    if not token:
        raise CrystaLLMInputError("no Hugging Face token: log in with `hf auth login` or set HF_TOKEN")
    files = files_to_push(folder, adapters)
    card = model_card_for(folder, list(dict.fromkeys(p.split("/")[1] for p in files if p.startswith("adapters/"))))
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.create_commit(repo_id, operations, commit_message=commit_message).commit_url


def model_card_for(folder: Path, adapters: list[str]) -> str:
    """The model card pushed with a model: the folder's own card (training command, data, tokens seen,
    hardware, results tables, as `train/export_model.py` writes it) under Hub metadata, plus what the push adds
    (adapters with their surrogates' held-out MAE, limitations, the data's licenses).

    >>> from crystallm.model_folder import DEFAULT_MODEL
    >>> from huggingface_hub import ModelCard
    >>> card = ModelCard(model_card_for(Path(DEFAULT_MODEL), ["band_gap"]))
    >>> card.data.library_name, "band_gap" in card.text
    ('transformers', True)
    """
    from huggingface_hub import ModelCard, ModelCardData

    own = folder / "README.md"
    body = ModelCard(own.read_text()).text if own.exists() else f"# {folder.name}\n"
    lines = ["", "## Property adapters", ""]
    if adapters:
        lines += ["One PEFT LoRA adapter per property in `adapters/<property>/`, loaded by name: "
                  "`crystallm generate --model REPO --adapter band_gap --target 2.0 [--guidance 2]`.", "",
                  "| adapter | surrogate predictor | held-out MAE | rows |", "|---|---|---|---|"]
        for name in adapters:
            report_file = folder / "surrogates" / name / "report.json"
            report = json.loads(report_file.read_text()) if report_file.exists() else None
            lines.append(f"| {name} | {report['chosen'] if report else '-'} | "
                         f"{report['held_out']['mae']:.3f} {report['unit']} |"
                         f" {report['held_out']['rows']:,} ({', '.join(report['held_out']['sources'])}) |"
                         if report else f"| {name} | - | - | - |")
    else:
        lines.append("None pushed.")
    lines += ["", "## Limitations", "",
              "- Trained on at most ~31k structures (the full MP-20 train split is not part of the data); inorganic, "
              "ordered, at most a few dozen atoms in the conventional cell.",
              "- Validity and stability numbers are from CPU-sized runs; stability is judged by CHGNet against an "
              "approximate hull, not by DFT.",
              "- Property targets far from the training data are clipped to the end of the conditioned range.",
              "", "## License", "", "Model: MIT. " + DATA_LICENSE]
    data = ModelCardData(library_name="transformers", pipeline_tag="text-generation", license="mit",
                         tags=["crystallm", "materials-science", "crystal-structure-generation", "cif", "peft"])
    return f"---\n{data.to_yaml()}\n---\n{body.rstrip()}\n" + "\n".join(lines) + "\n"
