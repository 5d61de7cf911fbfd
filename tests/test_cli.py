from pathlib import Path

import pytest

from crystallm import cli
from crystallm.io.cif import structure_from_cif

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_serialize_writes_good_files_and_reports_bad_ones(tmp_path, capsys):
    bad = tmp_path / "bad.cif"
    bad.write_text("data_broken\n_cell_length_a 3\n")
    out = tmp_path / "texts.txt"
    code = cli.main(["serialize", str(EXAMPLES / "NaCl.cif"), str(bad), str(EXAMPLES / "SrTiO3.cif"),
                     "--out", str(out)])
    assert code == 1
    texts = out.read_text().strip().split("\n\n")
    assert [t.split("\n")[0] for t in texts] == ["data_NaCl", "data_SrTiO3"]
    assert f"error: {bad}: MalformedCIFError" in capsys.readouterr().err


def test_to_cif_and_tokenize(tmp_path, capsys):
    text_file = tmp_path / "nacl.txt"
    assert cli.main(["serialize", str(EXAMPLES / "NaCl.cif"), "--out", str(text_file)]) == 0
    cif = tmp_path / "nacl.cif"
    assert cli.main(["to-cif", str(text_file), "--out", str(cif)]) == 0
    assert structure_from_cif(cif.read_text()).composition.reduced_formula == "NaCl"
    assert cli.main(["tokenize", str(text_file)]) == 0
    assert "22 tokens (with <bos>)" in capsys.readouterr().out


def test_symmetry_command(capsys):
    assert cli.main(["symmetry", str(EXAMPLES / "NaCl.cif")]) == 0
    assert "Fm-3m (225)" in capsys.readouterr().out


def _bad_inputs(tmp_path):
    """Files a user might point `evaluate` at by mistake."""
    (tmp_path / "corrupt.zip").write_bytes(b"PK\x03\x04 this is not a zip archive")
    (tmp_path / "empty").mkdir(exist_ok=True)
    return tmp_path


BAD_COMMANDS = [
    ["generate", "--num", "0"], ["generate", "--num", "-5"], ["generate", "--batch-size", "0"],
    ["generate", "--temperature", "-1"], ["generate", "--top-p", "2"], ["generate", "--top-p", "0"],
    ["generate", "--max-atoms", "0"], ["generate", "--top-k", "x"], ["generate", "--guidance", "nan"],
    ["generate", "--seed", "-1"], ["generate", "--min-distance", "-0.5"], ["generate", "--spacegroup", "231"],
    ["generate", "--formula", "Xx2O"],
    ["evaluate", "{tmp}/corrupt.zip"], ["evaluate", "{tmp}/empty"], ["evaluate", "{tmp}/no-such-file.zip"],
    ["evaluate", "mp20-bt/test", "--attempts", "0"], ["evaluate", "mp20-bt/test", "--limit", "0"],
    ["evaluate", "mp20-bt/test", "--relax-fmax", "-0.1"], ["evaluate", "mp20-bt/test", "--num-proc", "0"],
    ["design", "--target", "band_gap=2", "--num", "0"], ["design", "--target", "band_gap=2", "--top", "-1"],
    ["design", "--target", "band_gap=2", "--e-hull-max", "0"], ["design", "--target", "band_gap"],
    ["design", "--target", "band_gap=2", "--guidance", "-1"],
    ["serialize", "{tmp}/no-such.cif", "--symprec", "0"], ["symmetry", "{tmp}/a.cif", "--symprec", "-1"],
    ["to-cif", "{tmp}/no-such.txt"], ["push", "{tmp}/empty", "not a repo id"],
]


@pytest.mark.parametrize("arguments", BAD_COMMANDS, ids=" ".join)
def test_a_bad_option_value_is_one_line_and_exit_code_2(arguments, tmp_path, capsys):
    folder = _bad_inputs(tmp_path)
    out = tmp_path / "out"
    argv = [a.format(tmp=folder) for a in arguments]
    argv += ["--out", str(out)] if argv[0] in ("generate", "design") else []
    try:
        code = cli.main(argv)
    except SystemExit as stop:  # argparse's exit on a value it refuses
        code = stop.code
    error = capsys.readouterr().err.strip()
    assert code == 2, error
    assert len(error.splitlines()) == 1 and error.startswith(f"crystallm {argv[0]}: error: "), error
    assert not out.exists()  # refused before any compute or output
