import json

import datasets
import numpy as np
import torch

from crystallm import data
from crystallm.io.text_format import parse_structure
from crystallm.modeling import native_bf16
from crystallm.tokenization import CrystaLLMTokenizer
from crystallm.training.collator import PretrainingCollator, epoch_batches
from crystallm.training.pretrain import make_accelerator, pretrain


def tiny_config(tmp_path, **overrides) -> dict:
    config = {"corpus": "data/pretraining-corpus.csv.gz", "output_dir": str(tmp_path), "max_rows": 300,
              "eval_rows": 16, "seed": 3, "batch_size": 8, "learning_rate": 2e-3, "warmup_steps": 2, "max_steps": 8,
              "eval_every": 4, "save_every": 2, "mixed_precision": "no",
              "model": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 256, "masked_atom_weight": 0.5,
                        "contrastive_weight": 0.2}}
    config.update(overrides)
    return config


def losses_by_step(directory) -> dict[int, float]:
    rows = [json.loads(line) for line in (directory / "log.jsonl").read_text().splitlines()]
    return {row["step"]: row["train_loss"] for row in rows}


def test_resume_after_a_stop_gives_the_same_losses(tmp_path):
    straight = tmp_path / "straight"
    pretrain(tiny_config(straight))
    interrupted = tmp_path / "interrupted"
    pretrain(tiny_config(interrupted, stop_at_step=5))
    assert max(losses_by_step(interrupted)) == 5 and not (interrupted / "model.safetensors").exists()
    pretrain(tiny_config(interrupted))
    expected, resumed = losses_by_step(straight), losses_by_step(interrupted)
    assert sorted(resumed) == list(range(1, 9))
    assert np.allclose([resumed[s] for s in range(6, 9)], [expected[s] for s in range(6, 9)], rtol=0, atol=1e-6)
    assert (interrupted / "model.safetensors").exists()


def test_collator_masks_elements_and_builds_a_view():
    tokenizer = CrystaLLMTokenizer.from_format()
    texts = data.load_texts("data/pretraining-corpus.csv.gz")["text"][:8]
    batch = PretrainingCollator(tokenizer, seed=0)(texts)
    masked = batch["masked_labels"] != -100
    assert masked.any(dim=1).all()  # at least one masked element per sequence
    assert (batch["masked_input_ids"][masked] == tokenizer.mask_token_id).all()
    assert torch.equal(batch["input_ids"][~masked], batch["masked_input_ids"][~masked])
    # The view is a hard view: other tokens, the same crystal; and the collator is deterministic.
    views = tokenizer.batch_decode(batch["view_input_ids"], skip_special_tokens=True)
    for text, view in zip(texts, views):
        assert view != text and parse_structure(view).matches(parse_structure(text))
    again = PretrainingCollator(tokenizer, seed=0)(texts)
    assert all(torch.equal(batch[key], again[key]) for key in batch)
    # Views made beforehand are used, their rows shuffled anew at each visit.
    made = data.add_hard_views(datasets.Dataset.from_dict({"text": texts}), seed=0)
    lookup = dict(zip(made["text"], made["view"]))
    batch = PretrainingCollator(tokenizer, seed=0, views=lookup)(texts)
    for text, view in zip(texts, tokenizer.batch_decode(batch["view_input_ids"], skip_special_tokens=True)):
        assert sorted(view.splitlines()) == sorted(lookup[text].splitlines())
    assert set(PretrainingCollator(tokenizer, seed=0)(texts, auxiliary=False)) == {"input_ids", "attention_mask",
                                                                                    "labels"}


def test_auxiliary_passes_run_on_a_share_of_the_steps(tmp_path):
    pretrain(tiny_config(tmp_path, max_steps=4, auxiliary_every=2))
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert ["train_masked_atom" in row and "train_contrastive" in row for row in rows] == [True, False, True, False]


def test_epoch_batches_group_lengths_and_are_disjoint_across_processes():
    lengths = np.random.default_rng(0).integers(10, 400, size=1000)
    first, second = (epoch_batches(lengths, 8, 1, 0, rank=r, world=2, group=10) for r in (0, 1))
    assert not set(np.concatenate(first)) & set(np.concatenate(second))
    spread = np.mean([np.ptp(lengths[b]) for b in first + second])
    random_spread = np.mean([np.ptp(lengths[b]) for b in np.split(np.arange(1000), 125)])
    assert spread < 0.25 * random_spread  # little padding
    assert epoch_batches(lengths, 8, 1, 0)[0].tolist() != epoch_batches(lengths, 8, 2, 0)[0].tolist()


def test_training_falls_back_to_fp32_where_bf16_is_emulated():
    # Emulated bf16 (AVX2-only CPUs) trains about 27x slower than fp32; native bf16 keeps its autocast.
    accelerator = make_accelerator({"mixed_precision": "bf16"})
    assert accelerator.mixed_precision == ("bf16" if torch.cuda.is_available() or native_bf16() else "no")
