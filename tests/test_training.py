import json

import datasets
import numpy as np
import torch

from crystallm import data
from crystallm.compute import bf16_pays
from crystallm.io.text_format import parse_structure
from crystallm.tokenization import CrystaLLMTokenizer
from crystallm.training.collator import PretrainingCollator, epoch_batches
from crystallm.training.pretrain import make_accelerator, pretrain
from crystallm.training.settings import PretrainingSettings, TrainingSettings


def tiny_config(tmp_path, **overrides) -> dict:
    config = {"corpus": "data/pretraining-corpus.csv.gz", "output_dir": str(tmp_path), "max_rows": 300,
              "eval_rows": 16, "seed": 3, "batch_size": 8, "learning_rate": 2e-3, "warmup_steps": 2, "max_steps": 8,
              "eval_every": 4, "save_every": 2, "mixed_precision": "no",
              "model": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 256, "masked_atom_weight": 0.5,
                        "contrastive_weight": 0.2}}
    config.update(overrides)
    return config


def tiny_settings(tmp_path, **overrides) -> PretrainingSettings:
    return PretrainingSettings.from_dict(tiny_config(tmp_path, **overrides))


def losses_by_step(directory) -> dict[int, float]:
    rows = [json.loads(line) for line in (directory / "log.jsonl").read_text().splitlines()]
    return {row["step"]: row["train_loss"] for row in rows}


def test_resume_after_a_stop_gives_the_same_losses(tmp_path):
    straight = tmp_path / "straight"
    pretrain(tiny_settings(straight))
    interrupted = tmp_path / "interrupted"
    pretrain(tiny_settings(interrupted, stop_at_step=5))
    assert max(losses_by_step(interrupted)) == 5 and not (interrupted / "model.safetensors").exists()
    saved = sorted(path.suffix for path in (interrupted / "checkpoint").iterdir())
    assert saved == [".json"] * 2 + [".safetensors"] * 3  # no pickle: a checkpoint may be committed
    pretrain(tiny_settings(interrupted))
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
    pretrain(tiny_settings(tmp_path, max_steps=4, auxiliary_every=2))
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
    accelerator = make_accelerator(TrainingSettings(output_dir="unused", mixed_precision="bf16"))
    assert accelerator.mixed_precision == ("bf16" if torch.cuda.is_available() or bf16_pays() else "no")


def test_a_step_with_a_non_finite_gradient_is_skipped(tmp_path, monkeypatch):
    from crystallm.modeling import CrystaLLMForCausalLM

    forward, calls = CrystaLLMForCausalLM.forward, []

    def poisoned(self, *args, **kwargs):  # the third training pass overflows
        output = forward(self, *args, **kwargs)
        if self.training:
            calls.append(1)
            if len(calls) == 3:
                output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(CrystaLLMForCausalLM, "forward", poisoned)
    pretrain(tiny_settings(tmp_path, max_steps=5, eval_every=5))
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [row["skipped_steps"] for row in rows] == [0, 0, 1, 1, 1]
    assert np.isfinite(rows[-1]["train_loss"]) and np.isfinite(rows[-1]["eval_loss"])
    model = CrystaLLMForCausalLM.from_pretrained(tmp_path)
    assert all(torch.isfinite(parameter).all() for parameter in model.parameters())


def test_descriptions_augment_training_texts_and_not_held_out_ones():
    tokenizer = CrystaLLMTokenizer.from_format()
    texts = data.load_texts("data/pretraining-corpus.csv.gz")["text"][:6]
    made = data.add_descriptions(datasets.Dataset.from_dict({"text": texts}))
    options = dict(zip(made["text"], made["descriptions"]))
    collator = PretrainingCollator(tokenizer, masked_atom=False, contrastive=False, seed=0,
                                   descriptions={text: options[text] for text in texts[:4]})
    written = tokenizer.batch_decode(collator(texts, auxiliary=False)["input_ids"], skip_special_tokens=True)
    assert all(text in options[original] for text, original in zip(written[:4], texts[:4]))
    assert written[4:] == list(texts[4:])  # texts without descriptions (held out) stay as they are
    # Across batches the draw changes: over five batches of the same crystal, more than one text is written.
    seen = {tokenizer.decode(collator([texts[0], texts[i]], auxiliary=False)["input_ids"][0],
                             skip_special_tokens=True) for i in range(1, 6)}
    assert len(seen) > 1 and seen <= set(options[texts[0]])
    for original in texts:
        assert all(parse_structure(text).matches(parse_structure(original)) for text in options[original])


def test_keep_best_ships_the_lowest_held_out_loss_and_init_from_continues(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from crystallm.training import pretrain as loop

    # Held-out losses that fall, then rise (as when a small corpus overfits): the second evaluation's model ships.
    held_out = iter([3.0, 2.0, 2.5, 2.8])
    monkeypatch.setattr(loop, "evaluate_losses", lambda *args: {"eval_loss": next(held_out)})
    first = tmp_path / "first"
    pretrain(tiny_settings(first, keep_best=True, augment_descriptions=True, max_steps=8, eval_every=2,
                         model={"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 256}))
    state = json.loads((first / "train_state.json").read_text())
    assert (state["step"], state["best_step"], state["best_eval_loss"]) == (8, 4, 2.0)
    shipped, best = load_file(first / "model.safetensors"), load_file(first / "best" / "model.safetensors")
    assert all(torch.equal(shipped[name], best[name]) for name in best)
    monkeypatch.undo()
    # Continued from the kept model at a learning rate of 0: its weights, unchanged.
    second = tmp_path / "second"
    pretrain(tiny_settings(second, init_from=str(first), learning_rate=0.0, max_steps=1, eval_every=1,
                         model={"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 256}))
    continued = load_file(second / "model.safetensors")
    assert all(torch.equal(continued[name], best[name]) for name in best)


def test_a_sweep_gives_each_run_the_steps_that_fit_its_budget(tmp_path):
    from crystallm.training.sweep import run_sweep

    model = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 256}
    config = {"output_dir": str(tmp_path), "budget_seconds": 3, "probe_steps": 6, "max_epochs": 4,
              "defaults": {**tiny_config(tmp_path), "model": model, "progress": False, "keep_best": True},
              "runs": {"small": {}, "small-descriptions": {"augment_descriptions": True}}}
    records = {record.name: record for record in run_sweep(config)}
    assert set(records) == {"small", "small-descriptions"}
    for record in records.values():
        # at most max_epochs passes over the 284 training rows (batch 8): 142 steps
        assert 1 <= record.steps <= 142 and record.epochs <= 4
        assert record.parameters == records["small"].parameters and np.isfinite(record.best_eval_loss)
        assert (tmp_path / record.name / "model.safetensors").exists()
    assert json.loads((tmp_path / "sweep.json").read_text())[0]["name"] == "small"


def test_held_out_losses_count_every_row_even_fewer_than_a_batch():
    from crystallm.configuration import CrystaLLMConfig
    from crystallm.modeling import CrystaLLMForCausalLM
    from crystallm.training.pretrain import evaluate_losses

    tokenizer = CrystaLLMTokenizer.from_pretrained("crystallm/resources/default-model")
    torch.manual_seed(0)
    model = CrystaLLMForCausalLM(CrystaLLMConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_embd=32, n_head=2,
                                                 n_positions=256))
    collator = PretrainingCollator(tokenizer, max_length=256, masked_atom=False, contrastive=False)
    texts = data.load_texts("data/pretraining-corpus.csv.gz", 5)["text"]
    accelerator = make_accelerator(TrainingSettings(output_dir="unused", mixed_precision="no"))
    # 5 rows, batches of 8: one short batch (before, no batch at all and no held-out loss)
    alone = evaluate_losses(accelerator, model, collator, texts, 8)["eval_loss"]
    # batches of 2, 2 and 1: each batch's mean weighted by its rows, as the per-batch means say
    per_batch = [evaluate_losses(accelerator, model, collator, texts[i:i + 2], 2)["eval_loss"] for i in (0, 2, 4)]
    assert np.isfinite(alone)
    assert evaluate_losses(accelerator, model, collator, texts, 2)["eval_loss"] == \
        float(np.average(per_batch, weights=[2, 2, 1]))
