"""Where a model comes from: the default model shipped inside the package, a local folder saved with
`save_pretrained`, or a Hugging Face Hub id (its snapshot in the HF cache). Every function that takes a model takes
any of these.

The layout of a model folder (the same on disk and on the Hub): the transformers files (`config.json`,
`model.safetensors`, `generation_config.json`, the tokenizer's files), `adapters/<property>/` (PEFT's layout
for a named adapter), `surrogates/<property>/` (predictor and report, no pickle) and `training-corpus.csv.gz`
(the texts it was trained on: the novelty reference of `crystallm design`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from crystallm.errors import CheckpointError

DEFAULT_MODEL = Path(__file__).parent / "resources" / "default-model"
TRAINING_CORPUS = "training-corpus.csv.gz"  # id, source, text: what the model was trained on
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_folder(model: str | Path) -> Path:
    """A local folder for `model`: the folder itself, or the snapshot of the Hub repository `user/name`
    (downloaded into the Hugging Face cache, or taken from it when `HF_HUB_OFFLINE=1`). Errors name the model and
    what is missing.

    >>> from crystallm.model_folder import DEFAULT_MODEL
    >>> resolve_model_folder(DEFAULT_MODEL) == Path(DEFAULT_MODEL)
    True
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    path = Path(model)
    if path.exists():
        return path
    if not REPO_ID.match(str(model)):
        raise CheckpointError(f"{model}: no such model folder (nor a Hub id of the form user/name)")
    try:
        return Path(snapshot_download(str(model)))
    except GatedRepoError:
        raise CheckpointError(f"{model}: the repository is gated; accept its terms on the Hub and log in "
                              f"(hf auth login, or set HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{model}: no such repository on {constants.ENDPOINT} (or it is private and no token "
                              f"with access is set: hf auth login, or HF_TOKEN)") from None
    except RevisionNotFoundError as error:
        raise CheckpointError(f"{model}: {error}") from None
    except LocalEntryNotFoundError:
        where = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{constants.ENDPOINT} cannot be reached"
        raise CheckpointError(f"{model}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {where}; "
                              f"download it once online (crystallm generate --model {model}) or give a "
                              f"local folder") from None
    except HfHubHTTPError as error:
        raise CheckpointError(f"{model}: the Hub answered {error}") from None


def check_model_folder(folder: Path) -> dict:
    """The config of a crystallm model folder; CheckpointError for anything else (another kind of model, or
    no model at all)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{folder}: not a model folder (config.json: {error})") from None
    if config.get("model_type") != "crystallm":
        raise CheckpointError(f"{folder}: not a crystallm model (its config.json says model_type "
                              f"{config.get('model_type')!r})")
    return config


def require_safetensors(folder: Path, what: str = "model") -> None:
    """CheckpointError unless `folder` holds its weights as safetensors: pickled weights (pytorch_model.bin,
    adapter_model.bin) can run code when loaded, so they are refused, not loaded.

    >>> require_safetensors(DEFAULT_MODEL)
    >>> require_safetensors(Path("."), "adapter")
    Traceback (most recent call last):
    ...
    crystallm.errors.CheckpointError: .: the adapter folder holds no safetensors weights
    """
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(path.name for path in folder.glob("*.bin")) + sorted(path.name for path in folder.glob("*.pt"))
    refused = f" ({', '.join(pickled)} refused: pickled weights can run code; convert them to safetensors)" \
        if pickled else ""
    raise CheckpointError(f"{folder}: the {what} folder holds no safetensors weights{refused}")


def loaded_from(model) -> Path:
    """The folder a (possibly adapter-wrapped) model was loaded from."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return Path(base.name_or_path)
