import csv
import json

import pytest

from crystallm import cli
from crystallm.data import PROPERTY_UNITS, labelled_texts
from crystallm.design import Target, neutral_example, plan_design, run_design
from crystallm.errors import CrystaLLMInputError, CrystaLLMWarning
from crystallm.evaluation.relaxation import RelaxationSettings
from crystallm.generation.sampling import load_generator
from crystallm.generation.settings import SamplingSettings
from crystallm.model_folder import DEFAULT_MODEL
from crystallm.properties.surrogates import fit_surrogate, save_surrogate


@pytest.fixture(scope="module")
def design_model(model_with_adapters):
    """The tiny model with adapters, and a surrogate per property fitted on 200 real corpus rows."""
    model, tokenizer = load_generator(model_with_adapters, device="cpu")
    for name in ("band_gap", "formation_energy_per_atom"):
        texts, values = labelled_texts("data/pretraining-corpus.csv.gz", name, ("mp_20_biternary/val",))
        predictor = fit_surrogate(model, tokenizer, name, texts[:200], values[:200])
        mae = float(abs(predictor.predict(model, tokenizer, texts[200:300]) - values[200:300]).mean())
        report = {"property": name, "unit": PROPERTY_UNITS[name], "chosen": type(predictor.regressor).__name__,
                  "held_out": {"sources": ["mp_20_biternary/val rows 200-299"], "rows": 100, "mae": mae}}
        save_surrogate(predictor, report, model_with_adapters / "surrogates" / name)
    return model_with_adapters


def test_bad_design_requests_fail_or_warn_before_any_compute(design_model):
    with pytest.raises(CrystaLLMInputError, match="unknown property 'bandgap'; conditionable properties"):
        plan_design(design_model, ["bandgap=2.0"])
    with pytest.raises(CrystaLLMInputError, match="no adapter for bulk_modulus .*available: band_gap, "
                                                  "formation_energy_per_atom"):
        plan_design(design_model, ["bulk_modulus=100"])
    with pytest.warns(CrystaLLMWarning, match=r"outside the range .*\[0.0, 8.0\) eV"):
        plan_design(design_model, ["band_gap=11"])
    with pytest.raises(CrystaLLMInputError, match="elements Ne-F: no charge-neutral compound"):
        plan_design(design_model, ["band_gap=2"], "Ne,F")
    with pytest.raises(CrystaLLMInputError, match="expected PROPERTY=VALUE"):
        Target.parse("band_gap")
    assert neutral_example(("Na", "Cl")) == "NaCl"


@pytest.mark.slow
def test_a_design_run_funnels_ranks_writes_its_report_and_resumes(tmp_path):
    # The shipped model: an untrained one writes nothing valid, and a test over an empty shortlist proves nothing.
    model, tokenizer = load_generator(DEFAULT_MODEL, device="cpu")
    plan = plan_design(DEFAULT_MODEL, ["band_gap=1.0:8", "formation_energy_per_atom=-1.0:6"], num=8, top=3,
                       sampling=SamplingSettings(batch_size=4, guidance=2.0), e_hull_max=50.0,
                       relaxation=RelaxationSettings(steps=2))
    funnel = run_design(model, tokenizer, plan, tmp_path / "design", progress=False)
    counts = list(funnel.values())
    assert list(funnel) == ["generated", "parsed", "valid", "unique", "novel", "within_tolerance", "stable"]
    assert counts[0] == 8 and all(a >= b for a, b in zip(counts, counts[1:]))  # a funnel narrows
    report = json.loads((tmp_path / "design" / "funnel.json").read_text())
    assert report["funnel"] == funnel and "|predicted - target| / tolerance" in report["score"]
    with open(tmp_path / "design" / "shortlist.csv") as handle:
        shortlist = list(csv.DictReader(handle))
    assert funnel["stable"] >= 1 and len(shortlist) == min(3, funnel["stable"])
    assert [row["rank"] for row in shortlist] == [str(i) for i in range(1, len(shortlist) + 1)]
    assert [float(r["score"]) for r in shortlist] == sorted(float(r["score"]) for r in shortlist)
    for row in shortlist:
        assert (tmp_path / "design" / row["cif"]).exists()
    assert (tmp_path / "design" / "report.md").read_text().startswith("# crystallm design")
    assert (tmp_path / "design" / "funnel.png").stat().st_size > 0
    # Run again: everything is read back (the generation folders are full, the relaxations cached).
    assert run_design(model, tokenizer, plan, tmp_path / "design", progress=False) == funnel


def test_design_command_refuses_impossible_elements_with_one_line(design_model, tmp_path, capsys):
    code = cli.main(["design", "--model", str(design_model), "--target", "band_gap=2", "--elements", "Ne,F",
                     "--out", str(tmp_path / "d")])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1 and "no charge-neutral compound" in error
    assert not (tmp_path / "d").exists()
