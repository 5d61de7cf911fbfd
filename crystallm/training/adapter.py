"""Training a property's LoRA adapter (PEFT) on the frozen base model, by the training convention of
`crystallm.training.pretrain` (accelerate)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from crystallm.training.collator import epoch_batches
from crystallm.training.pretrain import make_accelerator, token_weighted


def train_adapter(config: dict) -> Path:
    """Train one PEFT LoRA adapter, named after its property, on a frozen base model (configs/adapter-*.yaml):
    causal LM on `<prop_i><value_k>` + text for the corpus rows that have the property, with the value dropped to
    `<prop_none>` with probability `drop_probability` (for classifier-free guidance). The loss skips the
    condition tokens. Saves the adapter to `output_dir/<property>/` (PEFT's layout for a named adapter) with a
    JSON log.
    """
    from peft import LoraConfig, get_peft_model

    from crystallm.data import labelled_texts
    from crystallm.generation.conditioning import condition_prefix
    from crystallm.generation.sampling import load_generator
    from crystallm.tokenization import NO_PROPERTY_TOKEN, PROPERTY_TOKENS, VALUE_TOKENS

    out, name, seed = Path(config["output_dir"]), config["property"], int(config.get("seed", 0))
    torch.manual_seed(seed)
    accelerator = make_accelerator(config)
    model, tokenizer = load_generator(config.get("model"), device=str(accelerator.device))
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
    model, optimizer = accelerator.prepare(model, optimizer)
    batch_size, batches, started = int(config["batch_size"]), [], time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / f"{name}_log.jsonl"
    log_path.unlink(missing_ok=True)
    model.train()
    for step in tqdm(range(1, int(config["max_steps"]) + 1), desc=f"adapter {name}", unit=" steps",
                     disable=not accelerator.is_main_process):
        if not batches:
            batches = epoch_batches(lengths, batch_size, step, seed, accelerator.process_index,
                                    accelerator.num_processes)
        rows = batches.pop()
        # Each row's draw depends on the step and the row only: processes sharing a step drop what one would.
        dropped = [np.random.default_rng([seed, step, int(i)]).random() < float(config.get("drop_probability", 0.1))
                   for i in rows]
        prefixes = [condition_prefix(name, None if drop else float(values[i])) for i, drop in zip(rows, dropped)]
        encoded = tokenizer([p + texts[i] + tokenizer.eos_token for p, i in zip(prefixes, rows)],
                            padding=True, return_tensors="pt", padding_side="right").to(accelerator.device)
        labels = encoded["input_ids"].clone()
        labels[:, :3] = -100  # <bos> and the two condition tokens are given, not predicted
        with accelerator.autocast():
            loss = model(**encoded, labels=labels).loss
        targets = ((labels[:, 1:] != -100) & (encoded["attention_mask"][:, 1:] == 1)).sum()
        loss = token_weighted(accelerator, {"loss": loss}, targets)["loss"]
        accelerator.backward(loss * accelerator.num_processes)
        optimizer.step()
        optimizer.zero_grad()
        step_loss = float(accelerator.reduce(loss.detach(), "sum"))
        if accelerator.is_main_process:
            with open(log_path, "a") as log:
                log.write(json.dumps({"step": step, "loss": step_loss,
                                      "seconds": time.perf_counter() - started}) + "\n")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(out)
    return out / name
