"""Training the refinement head (`crystallm.refinement.CrystalRefiner`) by denoising score matching on the corpus,
the GPT frozen, by the training convention of `crystallm.training.pretrain` (accelerate)."""

from __future__ import annotations

import copy
import csv
import gzip
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from crystallm import data
from crystallm.generation.sampling import load_generator
from crystallm.io import text_format
from crystallm.refinement import inference as refinement
from crystallm.refinement.network import CrystalRefiner, GeometryBatch
from crystallm.training.collator import epoch_batches, held_out_split
from crystallm.training.pretrain import make_accelerator, token_weighted
from crystallm.training.settings import RefinerSettings


def _training_batch(texts: list[str], rows: list[int], head: CrystalRefiner, model, tokenizer,
                    settings: RefinerSettings, pairs: dict[str, str],
                    step: int) -> tuple[GeometryBatch, torch.Tensor, ...]:
    """Corpus crystals moved off their place and the true way back: the head's input, the levels, the
    displacements and the strains. A row with a pair (`pairs`: true text -> the model's numbers on its skeleton)
    is that pair with probability `pair_share`, at the level of its own error, unless that level is beyond
    `sigma_range` (the model placed the sites another way); the others are noised (each at its own level,
    log-uniform in `sigma_range`, written as text). Each row's draws come from the seed, the step and the row
    alone, so processes sharing a step draw what one process would."""
    low, high = np.log(settings.sigma_range[0]), np.log(settings.sigma_range[1])
    noisy, sigmas, displacements, strains = [], [], [], []
    for text, row in zip(texts, rows):
        clean = refinement.CrystalGeometry.from_crystal(text_format.read_crystal_text(text))
        if len(clean.elements) > settings.max_atoms:
            continue
        rng = np.random.default_rng([settings.seed, step, row])
        geometry = None
        if text in pairs and rng.random() < settings.pair_share:  # the model's own error
            geometry = refinement.CrystalGeometry.from_crystal(text_format.read_crystal_text(pairs[text]))
            displacement, strain = geometry.displacement_to(clean)
            # The noise level that moves sites and cell this far (noise strains the cell by lattice_noise * sigma).
            sigma = max(float(np.sqrt((displacement ** 2).sum(axis=1).mean())), settings.sigma_range[0],
                        float(np.abs(np.linalg.eigvalsh(strain)).max()) / head.lattice_noise)
            if sigma > settings.sigma_range[1]:  # the sites placed another way or a cell far off: not to undo
                geometry = None
        if geometry is None:
            sigma = float(np.exp(rng.uniform(low, high)))
            crystal = refinement.noised_as_written(clean, sigma, head.lattice_noise, rng)
            if crystal is None:
                continue
            geometry = refinement.CrystalGeometry.from_crystal(crystal)
            displacement, strain = geometry.displacement_to(clean)
        noisy.append(geometry)
        sigmas.append(sigma)
        displacements.append(displacement)
        strains.append(strain)
    hidden = refinement.site_hidden_states(model, tokenizer, [geometry.crystal for geometry in noisy])
    batch = refinement.geometry_batch(noisy, hidden, head.cutoff, head.max_neighbours)
    device = batch.vectors.device
    return (batch, torch.tensor(sigmas, dtype=torch.float32, device=device),
            torch.tensor(np.concatenate(displacements), dtype=torch.float32, device=device),
            torch.tensor(np.stack(strains), dtype=torch.float32, device=device))


PAIR_COLUMNS = ("text", "sampled")


def read_pairs(path: str | Path) -> dict[str, str]:
    """The pairs file of `write_pairs`: true text -> the model's numbers on its skeleton."""
    with gzip.open(path, "rt", newline="") as handle:
        return {row["text"]: row["sampled"] for row in csv.DictReader(handle)}


def write_pairs(texts: list[str], sampled: list[str], path: str | Path) -> None:
    """Write (true text, the model's numbers on its skeleton) pairs as gzipped CSV, `PAIR_COLUMNS`."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(PAIR_COLUMNS)
        writer.writerows(zip(texts, sampled))


def train_refiner(settings: RefinerSettings) -> Path:
    """Train the refinement head of a saved model with the GPT frozen, as `settings` (a configs/refiner-*.yaml)
    say, and save the model with the head that had the lowest held-out error to `output_dir`; every setting of the
    head (`settings.refiner`: sizes, noise scale, starting noise and steps of inference) is saved in the model's
    config.
    The held-out rows are those of `pretrain` with the same seed. Logs the loss, and every `eval_every` steps the
    held-out denoising errors (`crystallm.refinement.denoising_errors`) at `eval_sigmas`.
    """
    out = Path(settings.output_dir)
    seed = settings.seed
    torch.manual_seed(seed)
    accelerator = make_accelerator(settings)
    model, tokenizer = load_generator(settings.model, device=str(accelerator.device))
    head = CrystalRefiner(model.config.n_embd, **settings.refiner)
    model.config.refiner = head.settings  # the head is rebuilt from these alone when the model is loaded
    model.refiner = head.to(accelerator.device)
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.startswith("refiner.")
    train_texts, eval_texts = held_out_split(data.load_texts(settings.corpus)["text"], seed, settings.eval_rows)
    eval_crystals = [text_format.read_crystal_text(text) for text in eval_texts]
    max_steps = settings.max_steps
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.learning_rate, weight_decay=0.01)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(200, max_steps // 10), max_steps)
    prepared, optimizer, schedule = accelerator.prepare(head, optimizer, schedule)
    eval_sigmas = list(settings.eval_sigmas)
    pairs = read_pairs(settings.pairs) if settings.pairs else {}
    eval_pairs = [(text_format.read_crystal_text(pairs[text]), crystal)
                  for text, crystal in zip(eval_texts, eval_crystals) if text in pairs]
    lengths = np.array([len(text) for text in train_texts])
    batches: list[np.ndarray] = []
    out.mkdir(parents=True, exist_ok=True)
    settings.save(out)
    log_path = out / "refiner_log.jsonl"
    log_path.unlink(missing_ok=True)
    best, best_state = math.inf, None
    started = time.perf_counter()
    for step in tqdm(range(1, max_steps + 1), desc="refiner", unit=" steps",
                     disable=not accelerator.is_main_process):
        if not batches:
            batches = epoch_batches(lengths, settings.batch_size, step, seed, accelerator.process_index,
                                    accelerator.num_processes)
        rows = [int(i) for i in batches.pop()]
        prepared.train()
        batch, sigma, displacement, strain = _training_batch([train_texts[i] for i in rows], rows, head, model,
                                                             tokenizer, settings, pairs, step)
        with accelerator.autocast():
            output = prepared(batch, sigma, displacement, strain)
        # Each term weighted by this process's share of what it averages over (atoms, crystals), so processes
        # together train as one process on all the rows.
        loss = (token_weighted(accelerator, {"loss": output.coordinate_loss}, torch.tensor(len(displacement)))["loss"]
                + token_weighted(accelerator, {"loss": output.lattice_loss}, torch.tensor(len(sigma)))["loss"])
        accelerator.backward(loss * accelerator.num_processes)
        accelerator.clip_grad_norm_(prepared.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        row = {"step": step, "loss": float(accelerator.reduce(loss.detach(), "sum")),
               "seconds": time.perf_counter() - started}
        if step % settings.eval_every == 0 or step == max_steps:
            head.eval()
            errors = refinement.denoising_errors(model, tokenizer, eval_crystals, eval_sigmas, seed=seed)
            row["eval"] = [asdict(error) for error in errors]
            # Judged by the RMSD after refining held-out pairs when there are any (the error the head is for),
            # else by the mean over the noise levels: the checkpoint that does best is kept.
            score = float(np.mean([error.rmsd_after for error in errors]))
            if eval_pairs:
                row["eval_pairs"] = asdict(refinement.pair_errors(model, tokenizer, eval_pairs))
                score = row["eval_pairs"]["rmsd_after"]
            if score < best:
                best, best_state = score, copy.deepcopy(accelerator.unwrap_model(prepared).state_dict())
                row["best"] = True
        if accelerator.is_main_process:
            with open(log_path, "a") as log:
                log.write(json.dumps(row) + "\n")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model.refiner = accelerator.unwrap_model(prepared)
        if best_state is not None:
            model.refiner.load_state_dict(best_state)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return out
