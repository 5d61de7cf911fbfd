"""Training a conditioning adapter (PEFT LoRA) on the frozen base model, by the training convention of
`crystallm.training.pretrain` (accelerate): one per property (`train_adapter`), and the powder-pattern adapter
with its pattern encoder (`train_pattern_adapter`). Both run one loop (`_train`); they differ in the prefix
each row gets and what its forward pass runs under."""

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
from crystallm.tokenization import NO_PROPERTY_TOKEN, PROPERTY_TOKENS, VALUE_TOKENS
from crystallm.training.collator import epoch_batches
from crystallm.training.pretrain import make_accelerator, token_weighted
from crystallm.training.settings import AdapterSettings

# rows of a batch and the step -> each row's prefix, and the context its forward pass runs in
Condition = Callable[[object, object, list[int], int], tuple[list[str], contextlib.AbstractContextManager]]


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

    def condition(model, tokenizer, rows: list[int], step: int):
        # Each row's draw depends on the step and the row only: processes sharing a step drop what one would.
        dropped = [np.random.default_rng([seed, step, int(i)]).random() < settings.drop_probability for i in rows]
        return ([condition_prefix(name, None if drop else float(values[i])) for i, drop in zip(rows, dropped)],
                contextlib.nullcontext())

    # The condition tokens' embeddings, never seen in pretraining, are trained too (with LoRA alone a first
    # adapter ignored the value token: the same samples for band gap 0 and 3 eV).
    return _train(settings, name, texts, condition, 2, [NO_PROPERTY_TOKEN, *PROPERTY_TOKENS, *VALUE_TOKENS])


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
    cells = np.stack([lattice_values(text) for text in corpus["text"]])
    cells = torch.tensor((cells - cells.mean(0)) / cells.std(0).clip(1e-6), dtype=torch.float32)

    def condition(model, tokenizer, rows: list[int], step: int):
        profiles = []
        for i in rows:  # drawn from the step and the row, as the property adapters' drops
            rng = np.random.default_rng([seed, step, int(i)])
            strength = 0.0 if rng.random() < settings.clean_share else rng.uniform(0.25, 1.0)
            profiles.append(degraded_profile(peaks[i], rng, strength))
        return [prefix] * len(rows), pattern_conditioning(model, tokenizer, np.stack(profiles))

    def lattice_loss(conditioned: dict, rows: list[int]) -> torch.Tensor:  # what pattern_conditioning recorded
        predicted = conditioned["lattice"].float()
        target = cells[rows].to(predicted.device)
        return settings.lattice_weight * nn.functional.mse_loss(predicted, target)

    return _train(settings, PATTERN_ADAPTER, corpus["text"], condition, 1 + PREFIX_LENGTH, [PATTERN_TOKEN],
                  pattern_encoder=True, auxiliary=lattice_loss)


def _train(settings: AdapterSettings, name: str, texts: list[str], condition: Condition, prefix_tokens: int,
           trainable_tokens: list[str], pattern_encoder: bool = False,
           auxiliary: Callable[[object, list[int]], torch.Tensor] | None = None) -> Path:
    """The adapter loop: LoRA on GPT-2's Conv1D layers, the embeddings of `trainable_tokens`, and with
    `pattern_encoder` a pattern encoder saved with the adapter; causal LM on each row's prefix + text,
    the loss skipping `<bos>` and the `prefix_tokens`, plus `auxiliary(what the condition's context gave, rows)`
    when given."""
    from peft import LoraConfig, get_peft_model

    out, seed = Path(settings.output_dir), settings.seed
    torch.manual_seed(seed)
    accelerator = make_accelerator(settings)
    model, tokenizer = load_generator(settings.model, device=str(accelerator.device))
    encoder = None
    if pattern_encoder:
        encoder = PatternEncoderConfig.for_model(model)
        attach_pattern_encoder(model, encoder)
    lora = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=0.0,
                      target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                      trainable_token_indices=tokenizer.convert_tokens_to_ids(trainable_tokens),
                      modules_to_save=["pattern_encoder"] if encoder is not None else None)
    model = get_peft_model(model, lora, adapter_name=name)
    # Record the base by how the config names it, not by this machine's absolute path.
    model.peft_config[name].base_model_name_or_path = settings.model or "crystallm/resources/default-model"
    lengths = np.array([len(text) for text in texts])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=settings.learning_rate, weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    batch_size, batches, started = settings.batch_size, [], time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    settings.save(out / name)
    log_path = out / f"{name}_log.jsonl"
    log_path.unlink(missing_ok=True)
    model.train()
    for step in tqdm(range(1, settings.max_steps + 1), desc=f"adapter {name}", unit=" steps",
                     disable=not accelerator.is_main_process):
        if not batches:
            batches = epoch_batches(lengths, batch_size, step, seed, accelerator.process_index,
                                    accelerator.num_processes)
        rows = batches.pop()
        prefixes, context = condition(accelerator.unwrap_model(model), tokenizer, rows, step)
        encoded = tokenizer([p + texts[i] + tokenizer.eos_token for p, i in zip(prefixes, rows)],
                            padding=True, return_tensors="pt", padding_side="right").to(accelerator.device)
        labels = encoded["input_ids"].clone()
        labels[:, :1 + prefix_tokens] = -100  # <bos> and the condition are given, not predicted
        with accelerator.autocast(), context as conditioned:
            loss = model(**encoded, labels=labels).loss
        targets = ((labels[:, 1:] != -100) & (encoded["attention_mask"][:, 1:] == 1)).sum()
        loss = token_weighted(accelerator, {"loss": loss}, targets)["loss"]
        extra = auxiliary(conditioned, rows) if auxiliary else torch.zeros((), device=loss.device)
        accelerator.backward((loss + extra) * accelerator.num_processes)
        optimizer.step()
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
