"""Training the continuous refinement head (`crystallm.modeling.CrystalRefiner`) on a frozen GPT, by the
training convention of `crystallm.training.pretrain` (accelerate)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from crystallm import data, modeling
from crystallm.generation import refinement
from crystallm.generation.grammar import CrystalGrammarLogitsProcessor
from crystallm.generation.sampling import load_generator
from crystallm.training.collator import epoch_batches, held_out_split


def train_refiner(config: dict) -> Path:
    """Train the continuous refinement head of a saved model with the GPT frozen, as a configs/refiner-*.yaml
    says, and save the model with its head to `output_dir`; every setting of the head (`config["refiner"]`:
    sizes, and the starting noise and steps of inference) is saved in the model's config. The held-out rows are
    those of `pretrain` with the same seed. Logs the denoising loss, and every `eval_every` steps the mean error
    of the values the LM samples and of the refined ones on held-out texts (normalized units, per kind).
    """
    from accelerate import Accelerator

    out = Path(config["output_dir"])
    seed = int(config.get("seed", 0))
    generator = torch.Generator().manual_seed(seed)
    accelerator = Accelerator(mixed_precision=config.get("mixed_precision", "bf16"))
    model, tokenizer = load_generator(config.get("model"), device=str(accelerator.device))
    head = modeling.CrystalRefiner(model.config.n_embd, **config["refiner"])
    model.config.refiner = head.settings  # the head is rebuilt from these alone when the model is loaded
    model.refiner = head.to(accelerator.device)
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.startswith("refiner.")
    train_texts, eval_texts = held_out_split(data.load_texts(config["corpus"])["text"], seed,
                                             int(config.get("eval_rows", 512)))
    vocabulary = CrystalGrammarLogitsProcessor(tokenizer)
    optimizer = torch.optim.AdamW(head.parameters(), lr=float(config["learning_rate"]), weight_decay=0.01)
    head, optimizer = accelerator.prepare(head, optimizer)
    sigma_range = tuple(config["sigma_range"])
    lengths = np.array([len(text) for text in train_texts])
    batches = []  # length-grouped, as in pretraining: little padding in the frozen GPT's forward pass
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "refiner_log.jsonl"
    log_path.unlink(missing_ok=True)
    started = time.perf_counter()
    for step in tqdm(range(1, int(config["max_steps"]) + 1), desc="refiner", unit=" steps",
                     disable=not accelerator.is_main_process):
        if not batches:
            batches = epoch_batches(lengths, int(config["batch_size"]), step, seed, accelerator.process_index,
                                    accelerator.num_processes)
        batch_texts = [train_texts[i] for i in batches.pop()]
        batch = refinement.slot_batch(model, tokenizer, batch_texts, lm_coarse=True, generator=generator,
                                      vocabulary=vocabulary)
        head.train()
        with accelerator.autocast():
            loss = head(batch.hidden, batch.kinds, batch.coarse, batch.clean, batch.mask, sigma_range, generator)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        row = {"step": step, "loss": float(loss.detach()), "seconds": time.perf_counter() - started}
        if step % int(config.get("eval_every", 200)) == 0 or step == int(config["max_steps"]):
            row.update(refinement_errors(model, tokenizer, eval_texts, vocabulary, generator))
        if accelerator.is_main_process:
            with open(log_path, "a") as log:
                log.write(json.dumps(row) + "\n")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model.refiner = accelerator.unwrap_model(head)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return out


@torch.no_grad()
def refinement_errors(model, tokenizer, texts: list[str], vocabulary,
                      generator: torch.Generator) -> dict[str, float]:
    """Mean absolute error (normalized units) per kind of the values the LM samples and of the refined ones."""
    model.refiner.eval()
    errors: dict[str, float] = {}
    counts: dict[str, float] = {}
    for start in range(0, len(texts), 64):
        batch = refinement.slot_batch(model, tokenizer, texts[start:start + 64], lm_coarse=True, generator=generator,
                                     vocabulary=vocabulary)
        refined = model.refiner.refine(batch.hidden, batch.kinds, batch.coarse, batch.mask, generator=generator)
        scale = modeling.SCALES[batch.kinds]
        for kind, label in enumerate(("length", "angle", "coordinate")):
            selected = batch.mask & (batch.kinds == kind)
            counts[label] = counts.get(label, 0.0) + float(selected.sum())
            for name, values in (("lm", batch.coarse), ("refined", refined)):
                error = modeling.periodic_difference(values - batch.clean, batch.kinds).abs() / scale
                key = f"eval_{name}_{label}"
                errors[key] = errors.get(key, 0.0) + float(error[selected].sum())
    return {key: total / max(1.0, counts[key.rsplit("_", 1)[1]]) for key, total in errors.items()}
