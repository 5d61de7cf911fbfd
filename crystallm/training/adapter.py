"""Training an adapter (PEFT LoRA) on the frozen base model, by the training convention of
`crystallm.training.pretrain` (accelerate): one per property (`train_adapter`), the powder-pattern adapter with
its pattern encoder (`train_pattern_adapter`) and the masked-atom adapter that ranks element substitutions
(`train_masked_atom_adapter`). All run one loop (`_train`); they differ in the batch each step's rows make and
what its forward pass runs under."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from crystallm import data
from crystallm.data import labelled_texts
from crystallm.diffraction.encoder import (
    PATTERN_ADAPTER,
    PATTERN_TOKEN,
    PREFIX_LENGTH,
    PatternEncoderConfig,
    attach_pattern_encoder,
    lattice_values,
    pattern_conditioning,
    pattern_prefix,
)
from crystallm.diffraction.patterns import Peaks, degraded_profile
from crystallm.errors import CrystaLLMInputError
from crystallm.generation.conditioning import condition_prefix
from crystallm.generation.sampling import load_generator
from crystallm.generation.substitution import MASKED_ATOM_ADAPTER
from crystallm.tokenization import MASK, NO_PROPERTY_TOKEN, PROPERTY_TOKENS, VALUE_TOKENS
from crystallm.training.collator import PretrainingCollator, epoch_batches
from crystallm.training.pretrain import make_accelerator, token_weighted
from crystallm.training.settings import AdapterSettings

# (model, tokenizer, rows of a batch, step) -> the forward's keyword arguments, the number of tokens its loss
# averages over, and the context the forward pass runs in
Batch = Callable[[object, object, list[int], int], tuple[dict, torch.Tensor, contextlib.AbstractContextManager]]


def train_adapter(settings: AdapterSettings) -> Path:
    """Train one PEFT LoRA adapter, named after its property, on a frozen base model (`settings`, from a
    configs/adapter-*.yaml): causal LM on `<prop_i><value_k>` + text for the corpus rows that have the property,
    with the value dropped to `<prop_none>` with probability `drop_probability` (for classifier-free guidance).
    The loss skips the condition tokens. Saves the adapter to `output_dir/<property>/` (PEFT's layout for a named
    adapter) with a JSON log and its settings.
    """
    name, seed = settings.property, settings.seed
    if not name:
        raise CrystaLLMInputError("a property adapter needs `property` (e.g. band_gap) in its settings")
    texts, values = labelled_texts(settings.corpus, name)

    def batch(model, tokenizer, rows: list[int], step: int):
        # Each row's draw depends on the step and the row only: processes sharing a step drop what one would.
        dropped = [np.random.default_rng([seed, step, int(i)]).random() < settings.drop_probability for i in rows]
        prefixes = [condition_prefix(name, None if drop else float(values[i])) for i, drop in zip(rows, dropped)]
        return *_prefixed_batch(tokenizer, prefixes, [texts[i] for i in rows], 2), contextlib.nullcontext()

    # The condition tokens' embeddings, never seen in pretraining, are trained too (with LoRA alone a first
    # adapter ignored the value token: the same samples for band gap 0 and 3 eV).
    return _train(settings, name, [len(text) for text in texts], batch,
                  [NO_PROPERTY_TOKEN, *PROPERTY_TOKENS, *VALUE_TOKENS])


def train_pattern_adapter(settings: AdapterSettings) -> Path:
    """Train the powder-pattern adapter (`crystallm.diffraction`) on a frozen base model
    (configs/adapter-xrd.yaml): LoRA, the pattern marker's embedding and the pattern encoder, on corpus texts
    after their pattern's slots. A row's pattern is its structure's computed peaks (`data.add_diffraction_peaks`,
    cached by `datasets`) made into a profile with degradations of random strength (`degraded_profile`; clean
    for a `clean_share` of the rows). The loss adds `lattice_weight` times the mean squared error of the
    encoder's lattice head (the text's cell, `lattice_values`, standardized over the corpus). Saves the adapter to
    `output_dir/xrd/` with `pattern_encoder.json`.
    """
    seed = settings.seed
    corpus = data.load_texts(settings.corpus, settings.max_rows)
    corpus = data.add_diffraction_peaks(corpus, settings.num_proc)
    peaks = [Peaks.from_row(row) for row in corpus]
    prefix = pattern_prefix()
    texts = corpus["text"]
    cells = np.stack([lattice_values(text) for text in texts])
    cells = torch.tensor((cells - cells.mean(0)) / cells.std(0).clip(1e-6), dtype=torch.float32)

    def batch(model, tokenizer, rows: list[int], step: int):
        profiles = []
        for i in rows:  # drawn from the step and the row, as the property adapters' drops
            rng = np.random.default_rng([seed, step, int(i)])
            strength = 0.0 if rng.random() < settings.clean_share else rng.uniform(0.25, 1.0)
            profiles.append(degraded_profile(peaks[i], rng, strength))
        inputs, targets = _prefixed_batch(tokenizer, [prefix] * len(rows), [texts[i] for i in rows],
                                          1 + PREFIX_LENGTH)
        return inputs, targets, pattern_conditioning(model, tokenizer, np.stack(profiles))

    def lattice_loss(conditioned: dict, rows: list[int]) -> torch.Tensor:  # what pattern_conditioning recorded
        predicted = conditioned["lattice"].float()
        target = cells[rows].to(predicted.device)
        return settings.lattice_weight * nn.functional.mse_loss(predicted, target)

    return _train(settings, PATTERN_ADAPTER, [len(text) for text in texts], batch, [PATTERN_TOKEN],
                  pattern_encoder=True, auxiliary=lattice_loss)


def train_masked_atom_adapter(settings: AdapterSettings) -> Path:
    """Train the masked-atom adapter (configs/adapter-masked_atom.yaml) on a frozen base model: LoRA and the
    `<mask>` embedding, on the masked-atom objective alone (one element of each crystal hidden wherever its text
    writes it, `PretrainingCollator`), so the base's generation is untouched. `crystallm substitute` ranks with it
    (`generation.substitution.load_substitution_model`). Saves the adapter to `output_dir/masked_atom/`.
    """
    texts = data.load_texts(settings.corpus, settings.max_rows)["text"]

    def batch(model, tokenizer, rows: list[int], step: int):
        collator = PretrainingCollator(tokenizer, contrastive=False, seed=settings.seed + step)
        inputs = collator([texts[i] for i in rows])
        del inputs["labels"]  # no causal-LM loss: the masked-atom loss alone
        return inputs, (inputs["masked_labels"] != -100).sum(), contextlib.nullcontext()

    return _train(settings, MASKED_ATOM_ADAPTER, [len(text) for text in texts], batch,
                  [MASK], objective_weights={"clm_weight": 0.0, "masked_atom_weight": 1.0})


def _load_adapter_weights(model, name: str, folder: Path) -> None:
    """Start the adapter `name` from the weights of a trained one (`init_from`: a folder of PEFT's layout, made by
    the same settings' rank and modules); an adapter of another shape is an error naming the folder."""
    from peft import load_peft_weights, set_peft_model_state_dict

    if not (folder / "adapter_model.safetensors").is_file():
        raise CrystaLLMInputError(f"init_from {folder}: no adapter_model.safetensors there")
    try:
        loaded = set_peft_model_state_dict(model, load_peft_weights(str(folder)), adapter_name=name)
    except RuntimeError as error:  # torch's size mismatch
        raise CrystaLLMInputError(f"init_from {folder}: not an adapter of these settings ({error})") from None
    if loaded.unexpected_keys:  # every key comes from the file: one the model lacks is another adapter's
        raise CrystaLLMInputError(f"init_from {folder}: weights this adapter lacks ({loaded.unexpected_keys[0]}, ...)")


def _prefixed_batch(tokenizer, prefixes: list[str], texts: list[str], prefix_tokens: int) -> tuple[dict, torch.Tensor]:
    """Causal-LM inputs of each prefix + text, the loss skipping `<bos>` and the `prefix_tokens` (given, not
    predicted), and the number of tokens it averages over."""
    encoded = tokenizer([p + text + tokenizer.eos_token for p, text in zip(prefixes, texts)], padding=True,
                        return_tensors="pt", padding_side="right")
    labels = encoded["input_ids"].clone()
    labels[:, :1 + prefix_tokens] = -100
    targets = ((labels[:, 1:] != -100) & (encoded["attention_mask"][:, 1:] == 1)).sum()
    return {**encoded, "labels": labels}, targets


def _train(settings: AdapterSettings, name: str, lengths: list[int], batch: Batch,
           trainable_tokens: list[str], pattern_encoder: bool = False,
           auxiliary: Callable[[object, list[int]], torch.Tensor] | None = None,
           objective_weights: dict[str, float] | None = None) -> Path:
    """The adapter loop over the corpus rows (batched by their texts' `lengths`): LoRA on GPT-2's Conv1D layers,
    the embeddings of `trainable_tokens`, and with `pattern_encoder` a pattern encoder saved with the adapter; the
    loss of the forward pass on each step's `batch`, plus `auxiliary(what the batch's context gave, rows)` when
    given. `objective_weights` set the base config's loss weights while training (not saved with the adapter)."""
    from peft import LoraConfig, get_peft_model
    from transformers import get_scheduler

    out, seed = Path(settings.output_dir), settings.seed
    torch.manual_seed(seed)
    accelerator = make_accelerator(settings)
    model, tokenizer = load_generator(settings.model, device=str(accelerator.device))
    for key, weight in (objective_weights or {}).items():
        setattr(model.config, key, weight)
    encoder = None
    if pattern_encoder:
        encoder = PatternEncoderConfig.for_model(model)
        attach_pattern_encoder(model, encoder)
    lora = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=0.0,
                      target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                      trainable_token_indices=tokenizer.convert_tokens_to_ids(trainable_tokens),
                      modules_to_save=["pattern_encoder"] if encoder is not None else None)
    model = get_peft_model(model, lora, adapter_name=name)
    if settings.init_from:
        _load_adapter_weights(model, name, Path(settings.init_from))
    # Record the base by how the config names it, not by this machine's absolute path.
    model.peft_config[name].base_model_name_or_path = settings.model or "crystallm/resources/default-model"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=settings.learning_rate, weight_decay=0.0)
    scheduler = get_scheduler(settings.lr_schedule, optimizer, num_warmup_steps=0,
                              num_training_steps=settings.max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    batch_size, batches, started = settings.batch_size, [], time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    settings.save(out / name)
    log_path = out / f"{name}_log.jsonl"
    log_path.unlink(missing_ok=True)
    model.train()
    for step in tqdm(range(1, settings.max_steps + 1), desc=f"adapter {name}", unit=" steps",
                     disable=not accelerator.is_main_process):
        if not batches:
            batches = epoch_batches(np.array(lengths), batch_size, step, seed, accelerator.process_index,
                                    accelerator.num_processes)
        picked = batches.pop()
        inputs, targets, context = batch(accelerator.unwrap_model(model), tokenizer, picked, step)
        inputs = {key: value.to(accelerator.device) for key, value in inputs.items()}
        with accelerator.autocast(), context as conditioned:
            loss = model(**inputs).loss
        loss = token_weighted(accelerator, {"loss": loss}, targets.to(accelerator.device))["loss"]
        extra = auxiliary(conditioned, picked) if auxiliary else torch.zeros((), device=loss.device)
        accelerator.backward((loss + extra) * accelerator.num_processes)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        step_loss = float(accelerator.reduce(loss.detach(), "sum"))
        if accelerator.is_main_process:
            with open(log_path, "a") as log:
                log.write(json.dumps({"step": step, "loss": step_loss, "auxiliary": float(extra),
                                      "seconds": time.perf_counter() - started}) + "\n")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(out)
        if encoder is not None:
            encoder.to_file(out / name)
    return out / name
