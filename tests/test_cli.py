from pathlib import Path

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
