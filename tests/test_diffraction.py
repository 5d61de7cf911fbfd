"""Powder patterns (computed, read, degraded, compared), the lattice fit and the pattern adapter (issue 22)."""

import csv
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from crystallm import cli
from crystallm.adapters import use_adapter
from crystallm.diffraction.encoder import pattern_conditioning, pattern_prefix
from crystallm.diffraction.lattice_fit import fit_lattice
from crystallm.diffraction.patterns import (
    GRID,
    MAX_VOLUME,
    Peaks,
    PowderPattern,
    agreement,
    degraded_profile,
    rank_by_agreement,
)
from crystallm.errors import CrystaLLMInputError
from crystallm.generation.prompt import Prompt, csp_prompts
from crystallm.generation.sampling import generate_structures, load_generator
from crystallm.generation.settings import SamplingSettings
from crystallm.io.cif import structure_from_cif


def _write_xy(path, two_theta, intensity, separator=" ", header="", comment="# exported pattern\n"):
    lines = [f"{x:.4f}{separator}{y:.4f}" for x, y in zip(two_theta, intensity)]
    path.write_text(comment + (header + "\n" if header else "") + "\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def test_structures(mp20_test_slice):
    return [(row["id"], structure_from_cif(row["cif"], row["id"])) for row in mp20_test_slice[:12]]


@pytest.mark.parametrize("content, problem", [
    ("", "no data rows"),
    ("# only a comment\n", "no data rows"),
    ("10 1\n20 nan\n30 2\n" + "".join(f"{40 + i} 1\n" for i in range(20)),
     "not a number (NaN or infinite) at data row 2"),
    ("10 1\n30 2\n20 3\n" + "".join(f"{40 + i} 1\n" for i in range(20)), "2θ is not increasing (30 then 20"),
    ("".join(f"{2 + 0.1 * i:.1f} 1\n" for i in range(200)), "convert d-spacing, Q or another wavelength"),
    ("".join(f"{0.5 + 0.01 * i:.2f} 1\n" for i in range(300)), "covers 0 of the 5-90 degrees"),
    ("10 1\n20\n", "line 2 has one column"),
    ("10 1\nabc def\n", "line 2 is not two numbers"),
    ("".join(f"{10 + i} 0\n" for i in range(60)), "no positive intensity"),
])
def test_bad_patterns_are_refused_naming_the_file_and_the_problem(tmp_path, content, problem):
    path = tmp_path / "measured.xy"
    path.write_text(content)
    with pytest.raises(CrystaLLMInputError, match="measured.xy") as error:
        PowderPattern.from_file(path)
    assert problem in str(error.value)


def test_unknown_file_kinds_and_missing_files_are_refused(tmp_path):
    with pytest.raises(CrystaLLMInputError, match="unknown kind of file"):
        PowderPattern.from_file(tmp_path / "pattern.raw")
    with pytest.raises(CrystaLLMInputError, match="cannot read it"):
        PowderPattern.from_file(tmp_path / "absent.xy")


def test_the_common_exports_give_one_profile(tmp_path, test_structures):
    structure = test_structures[0][1]
    profile = Peaks.from_structure(structure).to_profile(fwhm=0.2)
    two_theta = np.arange(5.0, 90.01, 0.02)  # a diffractometer's own steps
    intensity = 5000 * np.interp(two_theta, GRID, profile)
    xy = _write_xy(tmp_path / "p.xy", two_theta, intensity)
    csv = _write_xy(tmp_path / "p.csv", two_theta, intensity, separator=",", header="2theta,intensity", comment="")
    xye = tmp_path / "p.xye"
    xye.write_text("".join(f"{x:.4f} {y:.4f} {np.sqrt(y + 1):.4f}\n" for x, y in zip(two_theta, intensity)))
    profiles = [PowderPattern.from_file(path).to_profile() for path in (xy, csv, xye)]
    assert np.allclose(profiles[0], profiles[1], atol=1e-4) and np.allclose(profiles[0], profiles[2], atol=1e-4)
    assert profiles[0].max() == pytest.approx(1.0)
    assert agreement(profiles[0], profile) < 0.05  # the same pattern, read back from the export


def test_a_cif_gives_its_computed_pattern(tmp_path, test_structures):
    name, structure = test_structures[1]
    path = tmp_path / f"{name}.cif"
    path.write_text(structure.to(fmt="cif"))
    assert np.allclose(PowderPattern.from_file(path).to_profile(), Peaks.from_structure(structure).to_profile(),
                       atol=1e-5)


def test_degraded_patterns_still_point_to_their_own_crystal(test_structures):
    # A measured-like pattern (broadened, shifted, textured, noisy) agrees best with its own crystal's clean
    # pattern among 12 test crystals, for most of them.
    clean = [Peaks.from_structure(s).to_profile() for _, s in test_structures]
    rng = np.random.default_rng(0)
    found = 0
    for own, (_, structure) in enumerate(test_structures):
        degraded = degraded_profile(Peaks.from_structure(structure), rng)
        assert agreement(degraded, clean[own]) > 0  # it did change
        found += int(np.argmin([agreement(degraded, profile) for profile in clean]) == own)
    assert found >= 10


def test_ranking_puts_the_true_cell_first(test_structures):
    name, structure = test_structures[2]
    given = degraded_profile(Peaks.from_structure(structure), np.random.default_rng(1), strength=0.5)
    strained = [(f"{name} x{scale}", _scaled(structure, scale)) for scale in (0.97, 1.01, 1.05)]
    # a cell past MAX_VOLUME (the untrained model writes such) is not computed and comes last
    huge = ("huge", _scaled(structure, (2 * MAX_VOLUME / structure.volume) ** (1 / 3)))
    ranking = rank_by_agreement([huge] + strained + [(name, structure)], given)
    assert ranking[0].name == name
    assert [m.disagreement for m in ranking] == sorted(m.disagreement for m in ranking)
    assert ranking[-1].name == "huge" and ranking[-1].disagreement == np.inf and not ranking[-1].profile.any()


def _scaled(structure, scale):
    copy = structure.copy()
    copy.scale_lattice(structure.volume * scale ** 3)
    return copy


def test_pattern_adapter_round_trip_and_generation(model_with_pattern_adapter, test_structures):
    """Saved beside the model, loaded by name into a fresh model: the same logits for a pattern, other logits for
    another pattern; generation with a pattern gives the prompt's formula."""
    model, tokenizer = load_generator(model_with_pattern_adapter)
    trained = use_adapter(model, "xrd")
    profiles = np.stack([Peaks.from_structure(s).to_profile() for _, s in test_structures[:2]])
    ids = tokenizer([pattern_prefix() + "data_NaCl"] * 2, return_tensors="pt")["input_ids"]
    with torch.no_grad(), pattern_conditioning(trained, tokenizer, profiles):
        first = trained(ids).logits
    fresh, _ = load_generator(model_with_pattern_adapter)
    fresh = use_adapter(use_adapter(fresh, "band_gap"), "xrd")  # loaded beside another adapter, then chosen
    with torch.no_grad(), pattern_conditioning(fresh, tokenizer, profiles):
        again = fresh(ids).logits
    assert torch.allclose(first, again, atol=1e-5)
    # The same tokens in both rows: any difference is the pattern's (deterministic; untrained, so small).
    assert (again[0] - again[1]).abs().max() > 0
    pattern = PowderPattern(GRID, profiles[0].astype(float), "first.xy")
    samples = list(generate_structures(fresh, tokenizer, Prompt.of(formula="NaCl").with_pattern(pattern), num=2,
                                       settings=SamplingSettings(batch_size=2, max_atoms=8)))
    assert all(s.structure.composition.reduced_formula == "NaCl" for s in samples)
    with pytest.raises(CrystaLLMInputError, match="the prompts condition on xrd"):
        list(generate_structures(use_adapter(fresh, "band_gap"), tokenizer,
                                 Prompt.of(formula="NaCl").with_pattern(pattern), num=1))


def test_cli_refuses_a_bad_pattern_before_loading_the_model(tmp_path, capsys):
    bad = tmp_path / "scan.xy"
    bad.write_text("10 1\n30 2\n20 3\n")
    code = cli.main(["generate", "--model", str(tmp_path / "no-model"), "--xrd", str(bad), "--formula", "NaCl",
                     "--out", str(tmp_path / "out")])
    assert code == 2 and "scan.xy: 2θ is not increasing" in capsys.readouterr().err  # not the missing model
    assert not (tmp_path / "out").exists()


def test_csp_prompts_carry_the_targets_patterns(tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(Path("../shared/benchmarks/mp20bt-test-csp200.txt").read_text().split()[:3]))
    clean, names = csp_prompts("mp20-bt/test", ids, 2, pattern="clean")
    degraded, _ = csp_prompts("mp20-bt/test", ids, 2, pattern="degraded", seed=0)
    again, _ = csp_prompts("mp20-bt/test", ids, 2, pattern="degraded", seed=0)
    assert all(p.adapter_name == "xrd" for p in clean) and degraded == again  # reproducible
    for k in range(0, 6, 2):
        assert 0 < agreement(np.array(degraded[k].pattern), np.array(clean[k].pattern)) < 0.5  # degraded, same crystal
    assert clean[0].pattern != clean[2].pattern and names[0].split("__")[0] in clean[0].pattern_source
    with pytest.raises(CrystaLLMInputError, match="clean, degraded or none"):
        csp_prompts("mp20-bt/test", ids, 1, pattern="noisy")


def test_without_the_pattern_adapter_the_pattern_fits_and_ranks_the_samples(tmp_path, capsys):
    # The shipped model has no pattern adapter.
    pattern = _write_xy(tmp_path / "p.xy", GRID, Peaks.from_structure(
        Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [.5] * 3])).to_profile())
    code = cli.main(["generate", "--xrd", str(pattern), "--formula", "NaCl", "--num", "4", "--out",
                     str(tmp_path / "out")])
    assert code == 0 and "has no xrd adapter: generating from the prompt alone" in capsys.readouterr().out
    with open(tmp_path / "out" / "pattern_ranking.csv") as ranking:
        rows = list(csv.DictReader(ranking))
    written = {name.removesuffix(".cif") for name in zipfile.ZipFile(tmp_path / "out" / "cifs.zip").namelist()}
    assert 0 < len(rows) and {r["name"] for r in rows} <= written
    assert [float(r["disagreement"]) for r in rows] == sorted(float(r["disagreement"]) for r in rows)
    assert all(float(r["peak_misfit_after_fit"]) <= float(r["peak_misfit_before_fit"]) for r in rows
               if r["cell_fitted"] == "True")
    fitted = zipfile.ZipFile(tmp_path / "out" / "pattern_fitted.zip").namelist()
    assert sorted(fitted) == sorted(f"{r['name']}.cif" for r in rows)
    assert (tmp_path / "out" / "pattern_overlay.png").stat().st_size > 0


def test_the_lattice_fit_recovers_a_strained_cell_from_its_pattern(test_structures):
    # Real structures whose cell is 3% too large (as a generated attempt's may be): the fit to the true crystal's
    # degraded pattern gives its lattice lengths back to within 0.5% (a triclinic cell: 0.36%; the others 0.1%).
    recovered = []
    for place, (name, structure) in enumerate(test_structures[:8]):
        given = degraded_profile(Peaks.from_structure(structure), np.random.default_rng(place), strength=0.5)
        a, b, c, alpha, beta, gamma = structure.lattice.parameters
        strained = Structure(Lattice.from_parameters(1.03 * a, 1.03 * b, 1.03 * c, alpha, beta, gamma),
                             structure.species, structure.frac_coords)
        fit = fit_lattice(strained, given)
        assert fit.fitted
        target = sorted(SpacegroupAnalyzer(structure, symprec=0.1).get_conventional_standard_structure().lattice.abc)
        errors = np.abs(np.array(sorted(fit.structure.lattice.abc)) / np.array(target) - 1)
        recovered.append(bool(errors.max() < 0.005))
        assert fit.misfit_after <= fit.misfit_before
    assert all(recovered), recovered
