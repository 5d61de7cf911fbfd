"""Hostile input, family by family: each case ends in exit code 2 and one line on stderr naming the input and the
problem, before any output folder is made (issue 36). Inputs are made here; the model is the tiny one of conftest
or a copy of it with its weights pickled."""

import builtins
import errno
import shutil

import pytest
import torch
from pymatgen.core import Lattice, Structure

from crystallm import cli

DISORDERED_CIF = """data_x
_cell_length_a 4
_cell_length_b 4
_cell_length_c 4
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 90
_symmetry_space_group_name_H-M 'P 1'
loop_
_atom_site_label
_atom_site_type_symbol
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
_atom_site_occupancy
A Na 0 0 0 0.5
B K 0 0 0 0.5
C Cl 0.5 0.5 0.5 1
"""


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A folder of bad inputs."""
    folder = tmp_path_factory.mktemp("hostile")
    (folder / "lattice.extxyz").write_text('2\nLattice="bad" Properties=species:S:1:pos:R:3\nNa 0 0 0\nCl 1 1 1\n')
    (folder / "short.extxyz").write_text('3\nLattice="4 0 0 0 4 0 0 0 4" Properties=species:S:1:pos:R:3\nNa 0 0 0\n')
    (folder / "latin1-ids.txt").write_bytes(b"\xff\xfemp-1\n")
    (folder / "empty-ids.txt").write_text("\n\n")
    (folder / "no-columns.csv").write_text("name,formula\na,NaCl\n")
    (folder / "junk").mkdir()
    (folder / "junk" / "a.cif").write_text("hello")
    (folder / "junk" / "b.cif").write_bytes(bytes(range(256)))
    (folder / "good.cif").write_text(Structure(Lattice.cubic(4.2), ["Cs", "Cl"], [[0, 0, 0], [.5, .5, .5]]).to(
        fmt="cif"))
    (folder / "disordered.cif").write_text(DISORDERED_CIF)
    rng = torch.Generator().manual_seed(0)
    big = Structure(Lattice.cubic(30), ["Na", "Cl"] * 250, torch.rand(500, 3, generator=rng).numpy())
    (folder / "big.cif").write_text(big.to(fmt="cif"))
    huge = Structure(Lattice.cubic(1e6), ["Na", "Cl"], [[0, 0, 0], [.5, .5, .5]])  # a pattern would take minutes
    (folder / "huge-cell.cif").write_text(huge.to(fmt="cif"))
    return folder


@pytest.fixture(scope="module")
def pickled_model(tiny_model_dir, tmp_path_factory):
    """The tiny model folder with its weights as a pickle (pytorch_model.bin) instead of safetensors, and an
    adapter folder likewise."""
    from safetensors.torch import load_file

    folder = tmp_path_factory.mktemp("pickled") / "model"
    shutil.copytree(tiny_model_dir, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    adapter = folder.parent / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    torch.save({}, adapter / "adapter_model.bin")
    return folder


FAMILIES = {
    "malformed CIF": [(["substitute", "{h}/junk/a.cif", "--model", "{m}", "--element", "Na"], "not a readable CIF"),
                      (["embed", "{h}/junk/b.cif", "--model", "{m}"], "no readable structure to embed")],
    "extxyz": [(["evaluate", "{h}/lattice.extxyz"], "lattice.extxyz: frame 0 is not extended XYZ"),
               (["evaluate", "{h}/short.extxyz"], "short.extxyz: frame 0 is not extended XYZ")],
    "CSV": [(["evaluate", "{h}/no-columns.csv"], "a CSV needs a 'cif' or 'text' column")],
    "id lists": [(["evaluate", "{h}/good.cif", "--ids", "{h}/latin1-ids.txt"], "not a UTF-8 text file"),
                 (["evaluate", "{h}/good.cif", "--ids", "{h}/empty-ids.txt"], "holds no ids"),
                 (["evaluate", "{h}/good.cif", "--ids", "{h}/missing.txt"], "cannot read the ids")],
    "collections with nothing readable": [
        (["evaluate", "{h}/good.cif", "--test", "{h}/junk"], "junk: no readable structure to use as the test set"),
        (["evaluate", "{h}/good.cif", "--reference", "{h}/junk"], "no readable structure to use as the novelty"),
        (["evaluate", "{h}/good.cif", "--csp", "{h}/junk"], "junk: no readable structure to use as the CSP targets"),
        (["embed", "{h}/junk"], "junk: no readable structure to embed (2 entries); nothing written")],
    "device names": [(["generate", "--model", "{m}", "--device", "bogus"], "device 'bogus': not a torch device"),
                     (["generate", "--model", "{m}", "--device", "cuda:7"], "cannot use it")],
    "non-finite options": [(["generate", "--model", "{m}", "--temperature", "inf"], "temperature inf"),
                           (["generate", "--model", "{m}", "--temperature", "nan"], "temperature nan"),
                           (["generate", "--model", "{m}", "--guidance", "inf"], "guidance inf"),
                           (["generate", "--model", "{m}", "--top-p", "nan"], "top-p nan"),
                           (["generate", "--model", "{m}", "--min-distance", "inf"], "min distance inf")],
    "oversized structures": [(["substitute", "{h}/big.cif", "--model", "{m}", "--element", "Na"],
                              "more than the model reads"),
                             (["generate", "--model", "{m}", "--xrd", "{h}/huge-cell.cif", "--formula", "NaCl"],
                              "huge-cell.cif: a cell of 1e+18 Å³; patterns are computed for cells up to 5000 Å³")],
    "non-safetensors model folders": [
        (["generate", "--model", "{p}"], "holds no safetensors weights (pytorch_model.bin refused"),
        (["embed", "{h}/good.cif", "--model", "{p}"], "holds no safetensors weights"),
        (["substitute", "{h}/good.cif", "--model", "{p}", "--element", "Cs"], "holds no safetensors weights"),
        (["generate", "--model", "{m}", "--adapter", "{a}", "--target", "1"],
         "the adapter folder holds no safetensors")],
}
CASES = [(family, argv, expected) for family, cases in FAMILIES.items() for argv, expected in cases]


@pytest.mark.parametrize("family, arguments, expected", CASES, ids=[f"{f}: {' '.join(a)}" for f, a, _ in CASES])
def test_hostile_input_is_one_line_exit_2_and_no_output(family, arguments, expected, hostile, tiny_model_dir,
                                                        pickled_model, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [a.format(h=hostile, m=tiny_model_dir, p=pickled_model, a=pickled_model.parent / "adapter")
            for a in arguments]
    # where each command would write: evaluate its plots, embed a file, the others a folder
    argv += {"evaluate": ["--plots", str(out)], "embed": ["--out", str(out / "x.safetensors")]}.get(
        argv[0], ["--out", str(out)])
    code = cli.main(argv)
    error = capsys.readouterr().err.strip()
    assert code == 2, error
    assert len(error.splitlines()) == 1 and error.startswith(f"crystallm {argv[0]}: error: "), error
    assert expected in error, error
    assert not out.exists()


def test_a_disordered_cif_is_listed_and_the_batch_goes_on(hostile, capsys):
    """symmetry over several files: the disordered one is named with its reason; the good one is answered."""
    code = cli.main(["symmetry", str(hostile / "disordered.cif"), str(hostile / "good.cif")])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.err.strip().splitlines() == [
        f"error: {hostile / 'disordered.cif'}: InvalidStructureError: disordered (site 0 holds K0.5 Na0.5): spglib "
        f"needs one element per site"]
    assert "good.cif\tPm-3m (221)" in captured.out


@pytest.fixture
def booby_trapped_folder(hostile, tmp_path):
    """A folder of CIFs where one file is good and the others are traps: a link to /dev/zero, a named pipe, a link
    out of the folder, a dangling link, a link loop, an oversized file."""
    import os

    folder = tmp_path / "trapped"
    folder.mkdir()
    shutil.copy(hostile / "good.cif", folder / "good.cif")
    (folder / "zero.cif").symlink_to("/dev/zero")
    os.mkfifo(folder / "pipe.cif")
    (folder / "outside.cif").symlink_to(hostile / "good.cif")
    (folder / "dangling.cif").symlink_to(folder / "nothing.cif")
    (folder / "loop.cif").symlink_to(folder / "loop.cif")
    (folder / "huge.cif").write_bytes(b"#" * 2_000_000)
    return folder


REASONS = {"zero.cif": "a link leading outside", "pipe.cif": "not a regular file (a named pipe)",
           "outside.cif": "a link leading outside", "dangling.cif": "a link to nothing", "loop.cif": "a link loop",
           "huge.cif": "2,000,000 bytes, more than the limit of 1,048,576"}


def test_a_folder_walk_reads_regular_files_inside_it_and_lists_each_refused_entry(booby_trapped_folder, capsys):
    code = cli.main(["serialize", str(booby_trapped_folder), "--max-file-mb", "1"])
    captured = capsys.readouterr()
    assert code == 1 and captured.out.startswith("data_CsCl")  # the good file, and nothing hung
    lines = captured.err.strip().splitlines()
    assert len(lines) == len(REASONS)
    for name, reason in REASONS.items():
        assert any(line.startswith(f"error: {booby_trapped_folder / name}: {reason}") for line in lines), name
    assert cli.main(["serialize", str(booby_trapped_folder), "--max-file-mb", "1", "--follow-links"]) == 1
    captured = capsys.readouterr()
    assert captured.out.count("data_CsCl") == 2  # the link out of the folder, followed when asked
    assert f"{booby_trapped_folder / 'zero.cif'}: not a regular file (a character device)" in captured.err


def test_evaluate_skips_the_traps_with_their_reasons(booby_trapped_folder):
    from crystallm.evaluation.batch import EvaluationOptions, evaluate
    from crystallm.io.files import InputPolicy

    options = EvaluationOptions(num_proc=1, progress=False, inputs=InputPolicy(max_bytes=1_048_576))
    summary = evaluate(booby_trapped_folder, options=options)
    assert summary["entries"] == 1 and summary["validity"]["structural"] == 1.0
    skipped = summary["skipped"]["names"]
    assert sorted(name.split(" (")[0] for name in skipped) == sorted(REASONS)
    assert all(reason in " ".join(skipped) for reason in REASONS.values())


def test_evaluate_on_the_command_line_lists_each_skipped_entry_with_its_reason(booby_trapped_folder, capsys):
    assert cli.main(["evaluate", str(booby_trapped_folder), "--max-file-mb", "1", "--num-proc", "1", "--quiet"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("skipped: ")]
    assert len(lines) == len(REASONS)
    assert all(any(f"{name} ({reason}" in line for line in lines) for name, reason in REASONS.items())


NONSENSE = {
    "negative length": ("_cell_length_a   4.20000000", "_cell_length_a   -4.20000000",
                        "cell length not a finite number of Å above 0 (_cell_length_a -4.20000000)"),
    "non-finite length": ("_cell_length_b   4.20000000", "_cell_length_b   nan", "(_cell_length_b nan)"),
    "flat angle": ("_cell_angle_gamma   90.00000000", "_cell_angle_gamma   180.0",
                   "cell angle not between 0 and 180 degrees (_cell_angle_gamma 180.0)"),
    "atoms 0.04 Å apart": ("Cl  Cl1  1  0.50000000  0.50000000  0.50000000  1",
                           "Cl  Cl1  1  0.50000000  0.50000000  0.50000000  1\n  Cl  Cl2  1  0.50000000  0.50000000  "
                           "0.50952381  1", "atoms closer than 0.5 Å (the validity floor)"),
}


@pytest.mark.parametrize("old, new, message", NONSENSE.values(), ids=NONSENSE)
def test_a_cell_or_geometry_without_physical_sense_is_refused_not_repaired(old, new, message, hostile, tmp_path,
                                                                           capsys):
    good = (hostile / "good.cif").read_text()
    assert old in good
    bad = tmp_path / "bad.cif"
    bad.write_text(good.replace(old, new))
    assert cli.main(["serialize", str(bad)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and message in captured.err
    assert cli.main(["serialize", str(bad), "--out", str(tmp_path / "texts.txt")]) == 1
    assert "texts.txt: no structure serialized; not written" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bad.cif"]


class _FullDisk:
    """A text file on a disk that fills after 100 characters: writes and the flush of close refuse (ENOSPC)."""

    def __init__(self, path, mode):
        self.handle, self.size = builtins.open(path, mode), 0

    def write(self, text):
        self.size += len(text)
        if self.size > 100:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.handle.write(text)

    def flush(self):
        self.handle.flush()

    def close(self):
        self.handle.close()
        raise OSError(errno.ENOSPC, "No space left on device")


def test_serialize_on_a_full_disk_is_one_line_and_keeps_the_file_there_before(hostile, tmp_path, monkeypatch, capsys):
    out = tmp_path / "texts.txt"
    out.write_text("texts of an earlier run\n")
    monkeypatch.setattr(cli, "open", _FullDisk, raising=False)
    assert cli.main(["serialize", str(hostile / "good.cif"), str(hostile / "good.cif"), "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"crystallm serialize: error: {out}: cannot write (No space left on device); nothing written"]
    assert sorted(tmp_path.iterdir()) == [out] and out.read_text() == "texts of an earlier run\n"
