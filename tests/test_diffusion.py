import numpy as np
import pytest
import torch

from crystallm import data, symmetry
from crystallm.configuration import CrystaLLMConfig
from crystallm.errors import CrystaLLMInputError
from crystallm.generation.prompt import Prompt
from crystallm.generation.sampling import generate_structures, load_generator
from crystallm.generation.settings import SamplingSettings
from crystallm.generation.skeleton import sample_on_skeleton, skeleton_pairs
from crystallm.io import text_format
from crystallm.modeling import CrystaLLMForCausalLM, load_model
from crystallm.refinement.inference import (
    CrystalGeometry,
    geometry_batch,
    noised_as_written,
    pair_errors,
    refine_texts,
    site_hidden_states,
)
from crystallm.tokenization import CrystaLLMTokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return CrystaLLMTokenizer.from_format()


@pytest.fixture(scope="module")
def texts():
    return data.load_texts("data/test-sets.csv.gz")["text"][::700]


@pytest.fixture(scope="module")
def model_with_head(tokenizer):
    torch.manual_seed(0)
    config = CrystaLLMConfig(vocab_size=len(tokenizer), n_layer=1, n_embd=32, n_head=2, n_positions=256,
                             refiner={"width": 16, "layers": 1, "sigma_start": 0.2})
    return CrystaLLMForCausalLM(config).eval()


def test_the_true_way_back_recovers_the_clean_crystal_exactly(texts):
    rng = np.random.default_rng(0)
    for text in texts:
        clean = CrystalGeometry.from_crystal(text_format.read_crystal_text(text))
        noisy = CrystalGeometry.from_crystal(noised_as_written(clean, 0.1, 0.2, rng))
        displacement, strain = noisy.displacement_to(clean)
        back = CrystalGeometry.from_crystal(noisy.moved(displacement, strain))
        rest, rest_strain = back.displacement_to(clean)
        assert np.abs(rest).max() < 1e-9 and np.abs(rest_strain).max() < 1e-9, text
        # Noise moves the free parameters only: same space group, Wyckoff positions and formula.
        assert [(s.element, s.wyckoff.label) for s in noisy.crystal.sites] == \
            [(s.element, s.wyckoff.label) for s in clean.crystal.sites]


def test_the_head_turns_with_the_crystal(model_with_head, tokenizer, texts):
    """Outputs are sums of invariant weights times pair directions: rotating every vector rotates the
    displacements, and the strain turns as R e R^T."""
    crystals = [text_format.read_crystal_text(text) for text in texts[:3]]
    geometries = [CrystalGeometry.from_crystal(crystal) for crystal in crystals]
    batch = geometry_batch(geometries, site_hidden_states(model_with_head, tokenizer, crystals), 6.0, 24)
    rotation = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(1)))[0]
    sigma = torch.full((3,), 0.1)
    with torch.no_grad():
        displacement, strain = model_with_head.refiner.denoise(batch, sigma)
        batch.vectors = batch.vectors @ rotation.T
        turned, turned_strain = model_with_head.refiner.denoise(batch, sigma)
    assert displacement.abs().max() > 0
    torch.testing.assert_close(turned, displacement @ rotation.T, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(turned_strain, rotation @ strain @ rotation.T, atol=1e-5, rtol=1e-4)


def test_refinement_keeps_the_symmetry_and_moves_only_free_parameters(model_with_head, tokenizer, texts):
    refined = refine_texts(model_with_head, tokenizer, texts)
    moved = 0
    for text, crystal in zip(texts, refined):
        original = text_format.read_crystal_text(text)
        assert crystal.formula == original.formula and crystal.space_group == original.space_group
        assert [(s.element, s.wyckoff.label) for s in crystal.sites] == \
            [(s.element, s.wyckoff.label) for s in original.sites]
        structure = text_format.crystal_text_to_structure(crystal)
        assert symmetry.space_group_agrees(structure, original.space_group), text
        assert CrystalGeometry.from_crystal(crystal).shortest_distance() >= 0.5
        moved += crystal != original
    assert moved > 0  # an untrained head does move atoms and cells


def test_the_head_is_saved_and_loaded_with_the_model(model_with_head, tmp_path):
    model_with_head.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.refiner.settings == model_with_head.refiner.settings
    for (name, a), (_, b) in zip(model_with_head.refiner.state_dict().items(), loaded.refiner.state_dict().items()):
        assert torch.equal(a, b), name


def test_generate_refines_when_the_model_has_a_head_and_can_symmetrize(model_with_head, tokenizer):
    settings = SamplingSettings(batch_size=4, seed=2, max_atoms=24)
    prompt = Prompt.of(formula="SrTiO3")
    plain = list(generate_structures(model_with_head, tokenizer, prompt, 4, settings.replace(refine=False)))
    refined = list(generate_structures(model_with_head, tokenizer, prompt, 4, settings))
    assert [s.text for s in plain] == [s.text for s in refined]  # the same LM samples
    assert all(s.final_text == "" for s in plain) and all(s.final_text for s in refined)
    for sample in refined:
        assert sample.structure.composition.reduced_formula == "SrTiO3"
        assert text_format.parse_structure(sample.final_text).composition.reduced_formula == "SrTiO3"
    snapped = list(generate_structures(model_with_head, tokenizer, prompt, 4,
                                       settings.replace(refine=False, symmetrize=True)))
    assert all(s.structure.composition.reduced_formula == "SrTiO3" for s in snapped)


def test_a_head_switched_off_by_default_refines_only_when_asked(tokenizer):
    config = CrystaLLMConfig(vocab_size=len(tokenizer), n_layer=1, n_embd=32, n_head=2,
                             refiner={"width": 16, "layers": 1, "on_by_default": False})
    model = CrystaLLMForCausalLM(config).eval()
    settings = SamplingSettings(batch_size=2, seed=0, max_atoms=12)
    assert all(s.final_text == "" for s in generate_structures(model, tokenizer, num=2, settings=settings))
    assert all(s.final_text for s in generate_structures(model, tokenizer, num=2,
                                                         settings=settings.replace(refine=True)))


def test_refine_needs_a_head(tokenizer):
    model = CrystaLLMForCausalLM(CrystaLLMConfig(vocab_size=len(tokenizer), n_layer=1, n_embd=32, n_head=2))
    with pytest.raises(CrystaLLMInputError, match="no refinement head"):
        next(generate_structures(model, tokenizer, num=1, settings=SamplingSettings(refine=True)))


def test_train_refiner_saves_the_best_head_and_logs_held_out_denoising(tmp_path, tokenizer):
    import json

    from crystallm.refinement.training import train_refiner
    from crystallm.training.settings import RefinerSettings

    base = tmp_path / "base"
    config = CrystaLLMConfig(vocab_size=len(tokenizer), n_layer=1, n_embd=32, n_head=2)
    CrystaLLMForCausalLM(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    out = train_refiner(RefinerSettings.from_dict({
        "model": str(base), "corpus": "data/pretraining-corpus.csv.gz", "output_dir": str(tmp_path / "r"),
        "eval_rows": 8, "seed": 0, "refiner": {"width": 16, "layers": 1, "steps": 2}, "batch_size": 8,
        "learning_rate": 1e-3, "max_steps": 4, "eval_every": 2, "eval_sigmas": [0.1], "sigma_range": [0.01, 0.5]}))
    rows = [json.loads(line) for line in (out / "refiner_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)
    evaluated = [r for r in rows if "eval" in r]
    assert [r["step"] for r in evaluated] == [2, 4] and evaluated[0]["eval"][0]["rmsd_before"] > 0
    assert evaluated[0].get("best")  # the first evaluation is the best so far
    loaded = load_model(out)
    assert loaded.refiner is not None and loaded.config.refiner["width"] == 16 and loaded.config.refiner["steps"] == 2
    base_weights = load_model(base).state_dict()
    assert all(torch.equal(base_weights[k], v) for k, v in loaded.state_dict().items() if not k.startswith("refiner."))


def test_numbers_sampled_on_a_skeleton_keep_everything_else(tiny_model_dir, texts):
    model, tokenizer = load_generator(tiny_model_dir)
    chosen = texts[:12]
    sampled = sample_on_skeleton(model, tokenizer, chosen, seed=3)
    assert sampled == sample_on_skeleton(model, tokenizer, chosen, seed=3)  # seeded
    changed = 0
    for true_text, text in zip(chosen, sampled):
        true, crystal = text_format.read_crystal_text(true_text), text_format.read_crystal_text(text)
        skeleton = [(c.formula, c.space_group, c.formula_units, [(s.element, s.wyckoff.label) for s in c.sites])
                    for c in (true, crystal)]
        assert skeleton[0] == skeleton[1]
        # A coordinate its Wyckoff position fixes stays fixed (`.`); every free one is a number the model chose.
        assert [line.split()[2:].count(".") for line in text.splitlines() if line[:1].isupper()] == \
            [line.split()[2:].count(".") for line in true_text.splitlines() if line[:1].isupper()]
        changed += text != true_text
    assert changed >= 10  # an untrained model does not write the true numbers
    with pytest.raises(CrystaLLMInputError, match="longer than the model reads"):
        sample_on_skeleton(model, tokenizer, [texts[0] + "\nNa 1a . . ." * 200])


def test_the_head_trains_on_the_models_own_errors_and_held_out_pairs_judge_it(tmp_path, tokenizer):
    import json

    from crystallm.refinement.training import read_pairs, train_refiner, write_pairs
    from crystallm.training.settings import RefinerSettings

    base = tmp_path / "base"
    model = CrystaLLMForCausalLM(CrystaLLMConfig(vocab_size=len(tokenizer), n_layer=1, n_embd=32, n_head=2)).eval()
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    corpus = data.load_texts("data/pretraining-corpus.csv.gz", max_rows=40)
    corpus.to_csv(tmp_path / "corpus.csv", index=False)
    kept = skeleton_pairs(model, tokenizer, corpus["text"], seed=0, batch_size=16)
    assert 30 <= len(kept) <= 40 and all(t in corpus["text"] for t, _ in kept)  # a few make no cell
    assert kept == skeleton_pairs(model, tokenizer, corpus["text"], seed=0, batch_size=16)  # seeded
    write_pairs([t for t, _ in kept], [s for _, s in kept], tmp_path / "pairs.csv.gz")
    assert read_pairs(tmp_path / "pairs.csv.gz") == dict(kept)

    out = train_refiner(RefinerSettings.from_dict({
        "model": str(base), "corpus": str(tmp_path / "corpus.csv"), "pairs": str(tmp_path / "pairs.csv.gz"),
        "output_dir": str(tmp_path / "r"), "eval_rows": 8, "seed": 0, "refiner": {"width": 16, "layers": 1},
        "batch_size": 8, "learning_rate": 1e-3, "max_steps": 4, "eval_every": 2, "eval_sigmas": [0.1],
        "sigma_range": [0.01, 0.5]}))
    rows = [json.loads(line) for line in (out / "refiner_log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows)
    evaluated = [r for r in rows if "eval" in r]
    # The untrained model's numbers are far from the true ones: the held-out pairs' error before the head is large
    # and judges the checkpoints.
    assert all(r["eval_pairs"]["rmsd_before"] > 0.1 for r in evaluated) and evaluated[0].get("best")
    # Judged over the pairs within a distance: fewer pairs, each no farther than that.
    trained = load_model(out)
    crystals = [(text_format.read_crystal_text(s), text_format.read_crystal_text(t)) for t, s in kept]
    every, near = pair_errors(trained, tokenizer, crystals), pair_errors(trained, tokenizer, crystals, within=0.3)
    assert every.crystals == len(kept) and 0 < near.crystals < every.crystals and near.rmsd_before <= 0.3
    with pytest.raises(CrystaLLMInputError, match="no pair sits within -1"):
        pair_errors(trained, tokenizer, crystals, within=-1)


def test_a_pair_is_trained_at_the_level_of_its_own_error_and_one_beyond_the_range_gives_way_to_noise(
        model_with_head, tokenizer, texts):
    from crystallm.refinement.training import _training_batch
    from crystallm.training.settings import RefinerSettings

    # Crystals with free coordinates, so that a pair can move sites: one near its truth, one far from it.
    chosen = [text for text in texts if "." not in text.split("\n")[-1].split()[2:]][:2]
    clean = [CrystalGeometry.from_crystal(text_format.read_crystal_text(text)) for text in chosen]
    near = noised_as_written(clean[0], 0.05, 0.2, np.random.default_rng(1))
    far = noised_as_written(clean[1], 2.0, 0.0, np.random.default_rng(1))
    pairs = {chosen[0]: text_format.format_crystal_text(near), chosen[1]: text_format.format_crystal_text(far)}
    settings = RefinerSettings.from_dict({"corpus": "unused", "refiner": {}, "sigma_range": [0.02, 0.5],
                                          "output_dir": "unused", "pairs": "unused", "pair_share": 1.0})
    head = model_with_head.refiner
    _, sigmas, displacements, _ = _training_batch(chosen, [0, 1], head, model_with_head, tokenizer, settings, pairs, 1)
    expected, strain = CrystalGeometry.from_crystal(near).displacement_to(clean[0])
    level = max(np.sqrt((expected ** 2).sum(axis=1).mean()),
                np.abs(np.linalg.eigvalsh(strain)).max() / head.lattice_noise)
    assert float(sigmas[0]) == pytest.approx(level, rel=1e-5)
    assert np.allclose(displacements[:len(expected)].numpy(), expected, atol=1e-5)  # the pair itself, undone
    far_displacement, _ = CrystalGeometry.from_crystal(far).displacement_to(clean[1])
    assert np.sqrt((far_displacement ** 2).sum(axis=1).mean()) > 0.5  # beyond the range: not trained on
    assert 0.02 <= float(sigmas[1]) <= 0.5
