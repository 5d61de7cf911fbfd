"""Pretraining: a nanoGPT-style loop on accelerate over the objectives the model's config enables.

Every training loop of crystallm (this one, `crystallm.refinement.training`, `crystallm.training.adapter`) follows
one convention: an `Accelerator` (`make_accelerator`; bf16 autocast by default), `accelerator.prepare` for the
trained module and its optimizer, the loss from the model's `forward`, `accelerator.backward`, logs written by the
main process.

The loop runs unchanged on CPU, one GPU or several (`accelerate launch`, CPU processes too; several processes of
batch B train exactly as one of batch n x B): bf16 autocast where available, gradient accumulation, cosine
schedule, periodic held-out loss, a CSV log, and checkpoints that resume exactly (the batch order of each epoch
and every random draw of the collator depend only on the seed, the epoch and the batch's content, so a resumed run
sees the same batches and masks as an uninterrupted one). The log is JSON lines.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from crystallm import data
from crystallm.compute import bf16_pays
from crystallm.configuration import CrystaLLMConfig
from crystallm.modeling import CrystaLLMForCausalLM, CrystaLLMOutput
from crystallm.tokenization import CrystaLLMTokenizer
from crystallm.training.collator import PretrainingCollator, epoch_batches, held_out_split
from crystallm.training.settings import PretrainingSettings, TrainingSettings


def _losses(output: CrystaLLMOutput) -> dict[str, torch.Tensor]:
    """The losses of a forward pass by name, as the log writes them (loss, clm, masked_atom, contrastive)."""
    named = {"loss": output.loss, "clm": output.clm_loss, "masked_atom": output.masked_atom_loss,
             "contrastive": output.contrastive_loss}
    return {name: value for name, value in named.items() if value is not None}


def make_accelerator(settings: TrainingSettings):
    """The `Accelerator` of every training loop, from its settings' `mixed_precision` and
    `gradient_accumulation_steps`. Without CUDA it is told to use the CPU, so that processes started by
    `accelerate launch --multi_gpu` or torchrun form one CPU (gloo) group instead of training alone. Under DDP,
    parameters of an objective that is off (the contrastive projection) get no gradient, which DDP must be told.
    The processes split each step's rows between them (`epoch_batches`), so the schedule advances once a step
    (`split_batches`), not once per process."""
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs

    precision = settings.mixed_precision
    if precision == "bf16" and not torch.cuda.is_available() and not bf16_pays():
        # Emulated bf16 (AVX2-only CPUs) makes a training step about 27x slower than fp32 (measured: 114 against
        # about 3,100 tokens/s for the 3.7M model); the same config then trains in fp32.
        print("bf16 requested but it is slower than fp32 on this CPU (measured): training in fp32")
        precision = "no"
    return Accelerator(mixed_precision=precision,
                       gradient_accumulation_steps=settings.gradient_accumulation_steps,
                       cpu=not torch.cuda.is_available(),
                       dataloader_config=DataLoaderConfiguration(split_batches=True),
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def token_weighted(accelerator, losses: dict[str, torch.Tensor], targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each process's share of the losses of the whole step: its mean loss times its share of the step's
    `targets` (this process's count of target tokens). Summed over processes, this is the loss one process
    computes on all the rows, so `world` processes train (and log) exactly as one process with `world` times the
    batch. DDP averages gradients over the processes, hence the backward pass of `num_processes` times this
    share. One process: the losses unchanged.
    """
    if accelerator.num_processes == 1:
        return losses
    targets = targets.float()
    share = targets / accelerator.reduce(targets.detach().clone(), "sum")
    return {name: value * share for name, value in losses.items()}


def pretrain(settings: PretrainingSettings) -> Path:
    """Pretrain a model as `settings` (read from a configs/pretrain-*.yaml) say; resume from `output_dir/checkpoint`
    if there; the settings are saved as `output_dir/settings.json`.
    Each setting is described in `PretrainingSettings`: `keep_best` ships the model of the lowest held-out loss
    (a long run on a small corpus can overfit before its schedule ends), `init_from` continues pretraining from a
    model folder with a new schedule (a warm restart), `test_sets` logs held-out losses on test texts as
    `<name>_loss`, `<name>_clm`, ... beside the corpus rows' `eval_*`.

    Returns the output directory, which holds the model and tokenizer (`save_pretrained`), `log.jsonl` (one
    line per step: losses, learning rate, tokens/s, tokens seen and training seconds over all invocations, steps
    skipped for a non-finite gradient in this invocation;
    held-out losses every `eval_every` steps) and `train_state.json`.
    """
    out = Path(settings.output_dir)
    seed = settings.seed
    torch.manual_seed(seed)
    accelerator = make_accelerator(settings)
    tokenizer = CrystaLLMTokenizer.from_format()
    corpus = _corpus(settings)
    train_texts, eval_texts = held_out_split(corpus["text"], seed, settings.eval_rows)
    test_sets = {name: data.sample_texts(settings.test_file, source, settings.test_rows, seed)
                 for name, source in settings.test_sets.items()}

    model_config = CrystaLLMConfig(vocab_size=len(tokenizer), **settings.model)
    model_config._attn_implementation = "sdpa"
    if settings.init_from:  # continued pretraining: the weights of a model folder, a new schedule
        model = CrystaLLMForCausalLM.from_pretrained(settings.init_from, config=model_config)
    else:
        model = CrystaLLMForCausalLM(model_config)
    collator = _collator(settings, accelerator, tokenizer, model_config, corpus, eval_texts)
    batch_size = settings.batch_size
    auxiliary_every = settings.auxiliary_every
    lengths = np.array([len(text) for text in train_texts])  # characters: a cheap stand-in for tokens
    steps_per_epoch = len(epoch_batches(lengths, batch_size, 0, seed, accelerator.process_index,
                                        accelerator.num_processes)) // accelerator.gradient_accumulation_steps
    max_steps = settings.max_steps
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate,
                                  weight_decay=settings.weight_decay, betas=(0.9, 0.95))
    scheduler = get_cosine_schedule_with_warmup(optimizer, settings.warmup_steps, max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    state_path, checkpoint = out / "train_state.json", out / "checkpoint"
    step, tokens_before, seconds_before = 0, 0, 0.0  # totals of earlier invocations, for the model card
    best = {"best_eval_loss": math.inf, "best_step": 0}
    if checkpoint.exists() and state_path.exists():
        load_checkpoint(accelerator, model, optimizer, scheduler, checkpoint)
        saved = json.loads(state_path.read_text())
        step, tokens_before, seconds_before = saved["step"], saved["tokens_seen"], saved["train_seconds"]
        best = {key: saved.get(key, value) for key, value in best.items()}
        accelerator.print(f"resumed from {checkpoint} at step {step}")
    out.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        settings.save(out)
    log_path = out / "log.jsonl"
    if step == 0 and log_path.exists():
        log_path.unlink()
    started, tokens, stop_here, skipped = time.perf_counter(), 0, False, 0
    progress = tqdm(total=max_steps, initial=step, desc="pretraining", unit=" steps",
                    disable=not accelerator.is_main_process or not settings.progress)
    model.train()
    while step < max_steps and not stop_here:
        epoch, in_epoch = divmod(step, max(1, steps_per_epoch))
        batches = epoch_batches(lengths, batch_size, epoch, seed, accelerator.process_index,
                                accelerator.num_processes)
        micro = accelerator.gradient_accumulation_steps
        for index in range(in_epoch * micro, min(len(batches), steps_per_epoch * micro)):
            # The auxiliary objectives' passes on every `auxiliary_every`-th batch only: they cost a forward and
            # backward pass each, and a share of the steps may be enough.
            auxiliary = index % auxiliary_every == 0
            batch = {k: v.to(accelerator.device)
                     for k, v in collator([train_texts[i] for i in batches[index]], auxiliary).items()}
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    losses = _losses(model(**batch))
                # next-token targets: padding is never one
                losses = token_weighted(accelerator, losses, batch["attention_mask"][:, 1:].sum())
                accelerator.backward(losses["loss"] * accelerator.num_processes)
                finite = True
                if accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
                    finite = bool(torch.isfinite(norm))
                # A step whose gradient is not finite is skipped, not applied: on a GPU one such step (step
                # 1,647, bf16) turned every weight of a 26M model to NaN for the rest of its run.
                if finite:
                    optimizer.step()
                else:
                    skipped += 1
                scheduler.step()
                optimizer.zero_grad()
            tokens += int(batch["attention_mask"].sum())
            if not accelerator.sync_gradients:
                continue
            step += 1
            elapsed = time.perf_counter() - started
            row = {"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0],
                   **{f"train_{k}": float(accelerator.reduce(v.detach(), "sum")) for k, v in losses.items()},
                   "tokens_per_s": tokens / elapsed, "tokens_seen": tokens_before + tokens, "skipped_steps": skipped,
                   "train_seconds": seconds_before + elapsed}
            if step % settings.eval_every == 0 or step == max_steps:
                row.update(evaluate_losses(accelerator, model, collator, eval_texts, batch_size))
                for name, test_texts in test_sets.items():
                    losses = evaluate_losses(accelerator, model, collator, test_texts, batch_size)
                    row.update({key.replace("eval", name, 1): value for key, value in losses.items()})
                if settings.keep_best and row["eval_loss"] < best["best_eval_loss"]:
                    best = {"best_eval_loss": row["eval_loss"], "best_step": step}
                    if accelerator.is_main_process:
                        accelerator.unwrap_model(model).save_pretrained(out / "best")
            progress.update(1)
            progress.set_postfix(loss=f"{row['train_loss']:.3f}", tokens_per_s=f"{row['tokens_per_s']:.0f}")
            if accelerator.is_main_process:
                with open(log_path, "a") as log:
                    log.write(json.dumps(row) + "\n")
            stop_here = step == (settings.stop_at_step or -1)  # end this invocation early, resumable
            if step % settings.save_every == 0 or step == max_steps or stop_here:
                save_checkpoint(accelerator, model, optimizer, scheduler, checkpoint)
                if accelerator.is_main_process:
                    state_path.write_text(json.dumps({**{key: row[key] for key in
                                                         ("step", "tokens_seen", "train_seconds")}, **best}))
            if step >= max_steps or stop_here:
                break
        if stop_here:
            progress.close()
            accelerator.print(f"stopped at step {step} (stop_at_step); run again to resume")
            return out
    progress.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if settings.keep_best and (out / "best").exists():
            shutil.copytree(out / "best", out, dirs_exist_ok=True)
            accelerator.print(f"kept step {best['best_step']}: held-out loss {best['best_eval_loss']:.4f}")
        else:
            accelerator.unwrap_model(model).save_pretrained(out)
        tokenizer.save_pretrained(out)
    return out


def _corpus(settings: PretrainingSettings):
    """The corpus texts the settings train on (a `datasets.Dataset`: id, source, text)."""
    corpus = data.load_texts(settings.corpus, settings.max_rows)
    if settings.exclude_sources:  # a part of the corpus only
        unwanted = set(settings.exclude_sources)
        corpus = corpus.filter(lambda batch: [source not in unwanted for source in batch["source"]], batched=True)
    return corpus


def _collator(settings: PretrainingSettings, accelerator, tokenizer, model_config, corpus,
              eval_texts: list[str]) -> PretrainingCollator:
    """The collator of the objectives the model's config enables, with the hard views (contrastive) and the
    equivalent texts (`augment_descriptions`) it draws from, made once (one process makes them, the others read
    the `datasets` cache)."""
    views = None
    if model_config.contrastive_weight:
        with accelerator.main_process_first():
            corpus = data.add_hard_views(corpus, settings.seed, settings.num_proc)
        views = dict(zip(corpus["text"], corpus["view"]))
    descriptions = None
    if settings.augment_descriptions:
        with accelerator.main_process_first():
            corpus = data.add_descriptions(corpus, settings.num_proc)
        held_out = set(eval_texts)  # held-out losses stay on the canonical texts
        descriptions = {text: options for text, options in zip(corpus["text"], corpus["descriptions"])
                        if text not in held_out}
    return PretrainingCollator(tokenizer, max_length=model_config.n_positions,
                               masked_atom=bool(model_config.masked_atom_weight),
                               contrastive=bool(model_config.contrastive_weight), seed=settings.seed, views=views,
                               descriptions=descriptions)


def save_checkpoint(accelerator, model, optimizer, scheduler, directory: Path) -> None:
    """What resuming needs, with no pickle (a checkpoint may be committed and travel): the weights and the optimizer's
    moments as safetensors, its parameter groups and the schedule's position as JSON, torch's random state."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    directory.mkdir(parents=True, exist_ok=True)
    save_model(accelerator.unwrap_model(model), str(directory / "model.safetensors"))  # tied weights once
    state = optimizer.state_dict()
    save_file({f"{index}.{name}": value.contiguous() for index, moments in state["state"].items()
               for name, value in moments.items()}, str(directory / "optimizer.safetensors"))
    (directory / "optimizer.json").write_text(json.dumps(state["param_groups"]))
    (directory / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
    save_file({"torch": torch.get_rng_state()}, str(directory / "random.safetensors"))


def load_checkpoint(accelerator, model, optimizer, scheduler, directory: Path) -> None:
    """Restore what `save_checkpoint` wrote."""
    load_model(accelerator.unwrap_model(model), str(directory / "model.safetensors"))
    state: dict = {"state": {}, "param_groups": json.loads((directory / "optimizer.json").read_text())}
    for key, value in load_file(str(directory / "optimizer.safetensors")).items():
        index, name = key.split(".", 1)
        state["state"].setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(state)
    scheduler.load_state_dict(json.loads((directory / "scheduler.json").read_text()))
    torch.set_rng_state(load_file(str(directory / "random.safetensors"))["torch"])


@torch.no_grad()
def evaluate_losses(accelerator, model, collator: PretrainingCollator, texts: list[str],
                    batch_size: int) -> dict[str, float]:
    """Mean held-out losses of each objective, each batch weighted by its rows (the last may be short)."""
    model.eval()
    totals: dict[str, list[tuple[float, int]]] = {}  # each objective's (batch mean, rows of the batch)
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        batch = {k: v.to(accelerator.device) for k, v in collator(chunk).items()}
        with accelerator.autocast():
            losses = _losses(model(**batch))
        for name, value in losses.items():
            totals.setdefault(f"eval_{name}", []).append((float(value), len(chunk)))
    model.train()
    return {name: float(np.average([value for value, _ in pairs], weights=[rows for _, rows in pairs]))
            for name, pairs in totals.items()}


