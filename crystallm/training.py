"""Pretraining: the batch collator for the three objectives and a nanoGPT-style loop on accelerate.

The loop runs unchanged on CPU, one GPU or several (`accelerate launch`): bf16 autocast where available,
gradient accumulation, cosine schedule, periodic held-out loss, a CSV log, and checkpoints that resume exactly
(the batch order of each epoch and every random draw of the collator depend only on the seed, the epoch and the
batch's content, so a resumed run sees the same batches and masks as an uninterrupted one). The log is JSON lines.
"""

from __future__ import annotations

import json
import math
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from crystallm import serialization
from crystallm.tokenization import row_element_token_ids


@dataclass
class PretrainingCollator:
    """Texts -> the tensors of `CrystaLLMForCausalLM.pretraining_losses`.

    Masked-atom inputs replace each atom-site element token with `<mask>` with `mask_probability` (at least one
    per sequence); the contrastive view is the same crystal with its site rows shuffled.
    """

    tokenizer: object
    max_length: int = 512
    mask_probability: float = 0.3
    masked_atom: bool = True
    contrastive: bool = True
    seed: int = 0

    def __post_init__(self):
        self.element_ids = torch.tensor(sorted(set(row_element_token_ids(self.tokenizer))))

    def _encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        # Right padding in training: positions start at 0, as in generation (which pads left with position ids).
        return self.tokenizer([text + self.tokenizer.eos_token for text in texts], padding=True, truncation=True,
                              max_length=self.max_length, return_tensors="pt", padding_side="right")

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, zlib.crc32("\x00".join(texts).encode())])
        batch = self._encode(texts)
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        result = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.masked_atom:
            is_element = torch.isin(input_ids, self.element_ids)
            draw = torch.from_numpy(rng.random(input_ids.shape)) < self.mask_probability
            for row in range(input_ids.shape[0]):  # at least one masked element per sequence
                positions = is_element[row].nonzero().flatten()
                if len(positions) and not (draw[row] & is_element[row]).any():
                    draw[row, positions[rng.integers(len(positions))]] = True
            selected = is_element & draw
            result["masked_input_ids"] = input_ids.masked_fill(selected, self.tokenizer.mask_token_id)
            result["masked_labels"] = input_ids.masked_fill(~selected, -100)
        if self.contrastive:
            view = self._encode([serialization.shuffle_sites(text, rng) for text in texts])
            result["view_input_ids"], result["view_attention_mask"] = view["input_ids"], view["attention_mask"]
        return result


def epoch_batches(lengths: np.ndarray, batch_size: int, epoch: int, seed: int, rank: int = 0, world: int = 1,
                  group: int = 50) -> list[np.ndarray]:
    """This process's batches of row indices for an epoch. Rows are shuffled (seeded by seed and epoch), sorted by
    length within runs of `group` batches so that a batch holds rows of similar length (little padding), cut into
    batches (the last incomplete one dropped), and the batches shuffled and dealt to the processes in turn.

    >>> [b.tolist() for b in epoch_batches(np.array([5, 1, 5, 1, 5, 1]), 2, epoch=0, seed=0)]
    [[3, 5], [1, 2], [4, 0]]
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    span = batch_size * group
    order = np.concatenate([chunk[np.argsort(lengths[chunk], kind="stable")]
                            for chunk in np.split(order, range(span, len(order), span))]) if len(order) else order
    batches = [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches[rank::world]


def pretrain(config: dict) -> Path:
    """Pretrain a model as `config` (a configs/pretrain-*.yaml) says; resume from `output_dir/checkpoint` if there.
    `stop_at_step` ends this invocation at that step with a checkpoint (to train in chunks under a time limit).

    Returns the output directory, which holds the model and tokenizer (`save_pretrained`), `log.jsonl` (one
    line per step: losses, learning rate, tokens/s, tokens seen and training seconds over all invocations;
    held-out losses every `eval_every` steps) and `train_state.json`.
    """
    from accelerate import Accelerator
    from transformers import get_cosine_schedule_with_warmup

    from crystallm import data
    from crystallm.configuration import CrystaLLMConfig
    from crystallm.modeling import CrystaLLMForCausalLM
    from crystallm.tokenization import CrystaLLMTokenizer

    out = Path(config["output_dir"])
    seed = int(config.get("seed", 0))
    torch.manual_seed(seed)
    accelerator = Accelerator(mixed_precision=config.get("mixed_precision", "bf16"),
                              gradient_accumulation_steps=int(config.get("gradient_accumulation_steps", 1)))
    tokenizer = CrystaLLMTokenizer.from_format()
    texts = data.load_texts(config["corpus"])["text"]
    if config.get("max_rows"):
        texts = texts[: int(config["max_rows"])]
    holdout = np.random.default_rng(seed).permutation(len(texts))[: int(config.get("eval_rows", 512))]
    held = set(holdout.tolist())
    eval_texts = [texts[i] for i in holdout]
    train_texts = [text for i, text in enumerate(texts) if i not in held]

    model_config = CrystaLLMConfig(vocab_size=len(tokenizer), **config["model"])
    model_config._attn_implementation = "sdpa"
    model = CrystaLLMForCausalLM(model_config)
    collator = PretrainingCollator(tokenizer, max_length=model_config.n_positions,
                                   mask_probability=model_config.mask_probability,
                                   masked_atom=bool(model_config.masked_atom_weight),
                                   contrastive=bool(model_config.contrastive_weight), seed=seed)
    batch_size = int(config["batch_size"])
    lengths = np.array([len(text) for text in train_texts])  # characters: a cheap stand-in for tokens
    steps_per_epoch = len(epoch_batches(lengths, batch_size, 0, seed, accelerator.process_index,
                                        accelerator.num_processes)) // accelerator.gradient_accumulation_steps
    max_steps = int(config["max_steps"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(config["learning_rate"]),
                                  weight_decay=float(config.get("weight_decay", 0.1)), betas=(0.9, 0.95))
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(config.get("warmup_steps", 0)), max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    state_path, checkpoint = out / "train_state.json", out / "checkpoint"
    step, tokens_before, seconds_before = 0, 0, 0.0  # totals of earlier invocations, for the model card
    if checkpoint.exists() and state_path.exists():
        accelerator.load_state(str(checkpoint))
        saved = json.loads(state_path.read_text())
        step, tokens_before, seconds_before = saved["step"], saved["tokens_seen"], saved["train_seconds"]
        accelerator.print(f"resumed from {checkpoint} at step {step}")
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.jsonl"
    if step == 0 and log_path.exists():
        log_path.unlink()
    started, tokens, stop_here = time.perf_counter(), 0, False
    progress = tqdm(total=max_steps, initial=step, desc="pretraining", unit=" steps",
                    disable=not accelerator.is_main_process or not config.get("progress", True))
    model.train()
    while step < max_steps and not stop_here:
        epoch, in_epoch = divmod(step, max(1, steps_per_epoch))
        batches = epoch_batches(lengths, batch_size, epoch, seed, accelerator.process_index,
                                accelerator.num_processes)
        micro = accelerator.gradient_accumulation_steps
        for index in range(in_epoch * micro, min(len(batches), steps_per_epoch * micro)):
            batch = {k: v.to(accelerator.device) for k, v in collator([train_texts[i] for i in batches[index]]).items()}
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    losses = accelerator.unwrap_model(model).pretraining_losses(**batch)
                accelerator.backward(losses["loss"])
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), float(config.get("max_grad_norm", 1.0)))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            tokens += int(batch["attention_mask"].sum())
            if not accelerator.sync_gradients:
                continue
            step += 1
            elapsed = time.perf_counter() - started
            row = {"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0],
                   **{f"train_{k}": float(v.detach()) for k, v in losses.items()},
                   "tokens_per_s": tokens / elapsed, "tokens_seen": tokens_before + tokens,
                   "train_seconds": seconds_before + elapsed}
            if step % int(config.get("eval_every", 100)) == 0 or step == max_steps:
                row.update(evaluate_losses(accelerator, model, collator, eval_texts, batch_size))
            progress.update(1)
            progress.set_postfix(loss=f"{row['train_loss']:.3f}", tokens_per_s=f"{row['tokens_per_s']:.0f}")
            if accelerator.is_main_process:
                with open(log_path, "a") as log:
                    log.write(json.dumps(row) + "\n")
            stop_here = step == int(config.get("stop_at_step") or -1)  # end this invocation early, resumable
            if step % int(config.get("save_every", 200)) == 0 or step == max_steps or stop_here:
                accelerator.save_state(str(checkpoint))
                if accelerator.is_main_process:
                    state_path.write_text(json.dumps({key: row[key] for key in
                                                      ("step", "tokens_seen", "train_seconds")}))
            if step >= max_steps or stop_here:
                break
        if stop_here:
            progress.close()
            accelerator.print(f"stopped at step {step} (stop_at_step); run again to resume")
            return out
    progress.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(out)
        tokenizer.save_pretrained(out)
    return out


@torch.no_grad()
def evaluate_losses(accelerator, model, collator: PretrainingCollator, texts: list[str],
                    batch_size: int) -> dict[str, float]:
    """Mean held-out losses of each objective."""
    model.eval()
    totals: dict[str, list[float]] = {}
    for start in range(0, len(texts) - batch_size + 1, batch_size):
        batch = {k: v.to(accelerator.device) for k, v in collator(texts[start:start + batch_size]).items()}
        with accelerator.autocast():
            losses = accelerator.unwrap_model(model).pretraining_losses(**batch)
        for name, value in losses.items():
            totals.setdefault(f"eval_{name}", []).append(float(value))
    model.train()
    return {name: float(np.mean(values)) if values else math.nan for name, values in totals.items()}


def train_refiner(config: dict) -> Path:
    """Train the continuous refinement head (`crystallm.diffusion`) of a saved model with the GPT frozen, as a
    configs/refiner-*.yaml says, and save the model with its head to `output_dir`. The held-out rows are those
    of `pretrain` with the same seed. Logs the denoising loss, and every `eval_every` steps the mean error of the
    values the LM samples and of the refined ones on held-out texts (normalized units, per kind).
    """
    from crystallm import data, diffusion
    from crystallm.generation import load_generator
    from crystallm.grammar import CrystalGrammarLogitsProcessor

    out = Path(config["output_dir"])
    seed = int(config.get("seed", 0))
    generator = torch.Generator().manual_seed(seed)
    model, tokenizer = load_generator(config.get("model"), device="cpu")
    model.config.refiner = dict(config["refiner"])
    model.refiner = diffusion.CrystalRefiner(model.config.n_embd, **config["refiner"])
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.startswith("refiner.")
    texts = data.load_texts(config["corpus"])["text"]
    holdout = np.random.default_rng(seed).permutation(len(texts))[: int(config.get("eval_rows", 512))]
    held = set(holdout.tolist())
    eval_texts = [texts[i] for i in holdout]
    train_texts = [text for i, text in enumerate(texts) if i not in held]
    vocabulary = CrystalGrammarLogitsProcessor(tokenizer)
    optimizer = torch.optim.AdamW(model.refiner.parameters(), lr=float(config["learning_rate"]), weight_decay=0.01)
    sigma_range = tuple(config["sigma_range"])
    lengths = np.array([len(text) for text in train_texts])
    batches = []  # length-grouped, as in pretraining: little padding in the frozen GPT's forward pass
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(out / "refiner_log.jsonl", "w") as log:
        for step in tqdm(range(1, int(config["max_steps"]) + 1), desc="refiner", unit=" steps"):
            if not batches:
                batches = epoch_batches(lengths, int(config["batch_size"]), step, seed)
            batch_texts = [train_texts[i] for i in batches.pop()]
            batch = diffusion.slot_batch(model, tokenizer, batch_texts, lm_coarse=True, generator=generator,
                                         vocabulary=vocabulary)
            model.refiner.train()
            loss = model.refiner.loss(batch.hidden, batch.kinds, batch.coarse, batch.clean, batch.mask, sigma_range,
                                      generator)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            row = {"step": step, "loss": float(loss.detach()), "seconds": time.perf_counter() - started}
            if step % int(config.get("eval_every", 200)) == 0 or step == int(config["max_steps"]):
                row.update(refinement_errors(model, tokenizer, eval_texts, vocabulary, config, generator))
            log.write(json.dumps(row) + "\n")
            log.flush()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@torch.no_grad()
def refinement_errors(model, tokenizer, texts: list[str], vocabulary, config: dict,
                      generator: torch.Generator) -> dict[str, float]:
    """Mean absolute error (normalized units) per kind of the values the LM samples and of the refined ones."""
    from crystallm import diffusion

    model.refiner.eval()
    errors: dict[str, float] = {}
    counts: dict[str, float] = {}
    for start in range(0, len(texts), 64):
        batch = diffusion.slot_batch(model, tokenizer, texts[start:start + 64], lm_coarse=True, generator=generator,
                                     vocabulary=vocabulary)
        refined = model.refiner.refine(batch.hidden, batch.kinds, batch.coarse, batch.mask,
                                       float(config["sigma_start"]), int(config["steps"]), generator)
        scale = diffusion.SCALES[batch.kinds]
        for kind, label in enumerate(("length", "angle", "coordinate")):
            selected = batch.mask & (batch.kinds == kind)
            counts[label] = counts.get(label, 0.0) + float(selected.sum())
            for name, values in (("lm", batch.coarse), ("refined", refined)):
                error = diffusion.periodic_difference(values - batch.clean, batch.kinds).abs() / scale
                key = f"eval_{name}_{label}"
                errors[key] = errors.get(key, 0.0) + float(error[selected].sum())
    return {key: total / max(1.0, counts[key.rsplit("_", 1)[1]]) for key, total in errors.items()}


def train_adapter(config: dict) -> Path:
    """Train one PEFT LoRA adapter, named after its property, on a frozen base model (configs/adapter-*.yaml):
    causal LM on `<prop_i><value_k>` + text for the corpus rows that have the property, with the value dropped to
    `<prop_none>` with probability `drop_probability` (for classifier-free guidance). The loss skips the
    condition tokens. Saves the adapter to `output_dir/<property>/` (PEFT's layout for a named adapter) with a
    JSON log.
    """
    from peft import LoraConfig, get_peft_model

    from crystallm.conditioning import condition_prefix
    from crystallm.generation import load_generator
    from crystallm.surrogate import labelled_texts
    from crystallm.tokenization import NO_PROPERTY_TOKEN, PROPERTY_TOKENS, VALUE_TOKENS

    out, name, seed = Path(config["output_dir"]), config["property"], int(config.get("seed", 0))
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model, tokenizer = load_generator(config.get("model"), device="cpu")
    # LoRA on GPT-2's Conv1D layers; the condition tokens' embeddings, never seen in pretraining, are trained too
    # (with LoRA alone a first adapter ignored the value token: the same samples for band gap 0 and 3 eV).
    condition_ids = tokenizer.convert_tokens_to_ids([NO_PROPERTY_TOKEN, *PROPERTY_TOKENS, *VALUE_TOKENS])
    lora = LoraConfig(r=int(config.get("rank", 8)), lora_alpha=int(config.get("alpha", 16)), lora_dropout=0.0,
                      target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                      trainable_token_indices=condition_ids)
    model = get_peft_model(model, lora, adapter_name=name)
    # Record the base by how the config names it, not by this machine's absolute path.
    model.peft_config[name].base_model_name_or_path = config.get("model") or "crystallm/resources/default-model"
    texts, values = labelled_texts(config["corpus"], name)
    lengths = np.array([len(text) for text in texts])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=float(config["learning_rate"]), weight_decay=0.0)
    batch_size, batches, started = int(config["batch_size"]), [], time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    model.train()
    with open(out / f"{name}_log.jsonl", "w") as log:
        for step in tqdm(range(1, int(config["max_steps"]) + 1), desc=f"adapter {name}", unit=" steps"):
            if not batches:
                batches = epoch_batches(lengths, batch_size, step, seed)
            rows = batches.pop()
            dropped = rng.random(len(rows)) < float(config.get("drop_probability", 0.1))
            prefixes = [condition_prefix(name, None if drop else float(values[i])) for i, drop in zip(rows, dropped)]
            encoded = tokenizer([p + texts[i] + tokenizer.eos_token for p, i in zip(prefixes, rows)],
                                padding=True, return_tensors="pt", padding_side="right")
            labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
            labels[:, :3] = -100  # <bos> and the two condition tokens are given, not predicted
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(**encoded, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            log.write(json.dumps({"step": step, "loss": float(loss.detach()),
                                  "seconds": time.perf_counter() - started}) + "\n")
            log.flush()
    model.save_pretrained(out)
    return out / name
