"""Runs the cases of issue 39 ("Nothing silently wrong") against one checkout of crystallm and records, per case,
the exit code, the last line printed and what is on disk, as JSON: run it on the commit before the issue and on
today's to get the before/after table of docs/robustness.md.

    python scripts/hostile_cases.py --label after --out results/hostile-cases
    git worktree add /tmp/before 1ad6c4d^   # the tree issues 36 and 39 were filed against
    python scripts/hostile_cases.py --source /tmp/before --label before --out results/hostile-cases

Each command runs with a wall-clock limit and a 16 GiB address-space limit (4 GiB where /dev/zero is read), so a
case that hangs or exhausts memory in a checkout ends as "killed" or "MemoryError" instead of taking the machine.
The full-disk case mounts a 16 KiB tmpfs (root only; otherwise it is skipped and says so).
"""

import argparse
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from pymatgen.core import Lattice, Structure

MEMORY_LIMIT = 16 * 1024**3  # address space: torch reserves far more than it touches
CUBIC_CIF = Structure(Lattice.cubic(4.2), ["Cs", "Cl"], [[0, 0, 0], [.5, .5, .5]]).to(fmt="cif")


class Runner:
    """Starts `crystallm` from one checkout (its source first on PYTHONPATH) in a scratch folder."""

    def __init__(self, source: Path | None, work: Path):
        self.work = work
        self.memory_limit = MEMORY_LIMIT
        # One thread each (a checkout from before `--threads` reads it too): the cases measure behaviour, not speed.
        self.env = dict(os.environ, PYTHONPATH=str(source) if source else os.environ.get("PYTHONPATH", ""),
                        OMP_NUM_THREADS="1")

    def start(self, *argv: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", "import sys; from crystallm.cli import main; sys.exit(main())",
                                 *argv], cwd=self.work, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, errors="replace", preexec_fn=self._limit_memory)

    def _limit_memory(self):
        resource.setrlimit(resource.RLIMIT_AS, (self.memory_limit, self.memory_limit))

    def finish(self, process: subprocess.Popen, timeout: float) -> dict:
        """Exit code (or "killed after N s"), the first and last lines on stderr, how many lines on each stream."""
        try:
            out, err = process.communicate(timeout=timeout)
            code = process.returncode
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
            code = f"killed after {timeout:.0f} s"
        lines = [line for line in err.splitlines()
                 if line.strip() and not any(noise in line for noise in ("Warning", "warn(", "/s]"))]
        return {"exit": code if not isinstance(code, int) or code >= 0 else f"signal {-code}",
                "first_line": lines[0].strip()[:240] if lines else "",
                "last_line": lines[-1].strip()[:240] if len(lines) > 1 else "", "stderr_lines": len(lines),
                "stdout_lines": len(out.splitlines())}

    def run(self, *argv: str, timeout: float = 120) -> dict:
        return self.finish(self.start(*argv), timeout)


def _journal(folder: Path) -> str:
    """What a run folder holds: journal lines, distinct indices, zip members and duplicate names, summary count."""
    if not folder.exists():
        return "no folder"
    journal = folder / "samples.jsonl"
    rows = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()] if journal.exists() else []
    indices = {row.get("index") for row in rows}
    members = []
    if (folder / "cifs.zip").exists():
        with zipfile.ZipFile(folder / "cifs.zip") as archive:
            members = archive.namelist()
    summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").exists() else {}
    return (f"journal {len(rows)} lines, {len(indices)} distinct indices; zip {len(members)} members "
            f"({len(members) - len(set(members))} duplicate names); summary.json "
            f"{summary.get('entries', '-')}")


def _trap_folder(work: Path, name: str, trap) -> Path:
    folder = work / name
    folder.mkdir()
    (folder / "good.cif").write_text(CUBIC_CIF)
    trap(folder)
    return folder


def case_concurrent_generate(runner: Runner) -> dict:
    first = runner.start("generate", "--num", "64", "--seed", "0", "--out", "conc")
    second = runner.start("generate", "--num", "64", "--seed", "1", "--out", "conc")
    results = [runner.finish(first, 300), runner.finish(second, 300)]
    winner = "1" if results[0]["exit"] != 0 else "0"  # the seed of the run that was not refused
    lone = runner.run("generate", "--num", "64", "--seed", winner, "--out", "lone", timeout=300)
    same = _texts(runner.work / "conc") == _texts(runner.work / "lone")
    return {"runs": results, "lone": lone["exit"], "disk": _journal(runner.work / "conc"),
            "texts_equal_to_a_lone_run": same}


def _texts(folder: Path) -> list[str]:
    journal = folder / "samples.jsonl"
    if not journal.exists():
        return []
    rows = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
    return [row.get("text") for row in sorted(rows, key=lambda row: row.get("index", 0))]


def _when_written(folder: Path, lines: int, process: subprocess.Popen) -> None:
    """Waits until the run's journal holds `lines` lines (or the process ended)."""
    journal = folder / "samples.jsonl"
    while process.poll() is None and (not journal.exists() or len(journal.read_text().splitlines()) < lines):
        time.sleep(0.2)


def case_concurrent_resume(runner: Runner) -> dict:
    started = runner.start("generate", "--num", "400", "--seed", "0", "--out", "resumed")
    _when_written(runner.work / "resumed", 100, started)
    started.send_signal(signal.SIGKILL)
    started.communicate()
    interrupted = _journal(runner.work / "resumed")
    first = runner.start("generate", "--num", "400", "--seed", "0", "--out", "resumed", "--resume")
    second = runner.start("generate", "--num", "400", "--seed", "0", "--out", "resumed", "--resume")
    results = [runner.finish(first, 400), runner.finish(second, 400)]
    lone = runner.run("generate", "--num", "400", "--seed", "0", "--out", "lone400", timeout=400)
    return {"after_kill": interrupted, "runs": results, "lone": lone["exit"],
            "disk": _journal(runner.work / "resumed"),
            "texts_equal_to_a_lone_run": _texts(runner.work / "resumed") == _texts(runner.work / "lone400")}


def case_link_to_dev_zero(runner: Runner) -> dict:
    folder = _trap_folder(runner.work, "zero", lambda f: (f / "zero.cif").symlink_to("/dev/zero"))
    runner.memory_limit = 4 * 1024**3  # reading /dev/zero into memory ends here, not at the machine's 24 GiB
    return runner.run("serialize", str(folder), timeout=90)


def case_named_pipe(runner: Runner) -> dict:
    folder = _trap_folder(runner.work, "fifo", lambda f: os.mkfifo(f / "pipe.cif"))
    return {"serialize": runner.run("serialize", str(folder), timeout=30),
            "evaluate": runner.run("evaluate", str(folder), timeout=30)}


def case_link_outside(runner: Runner) -> dict:
    outside = runner.work / "outside.cif"
    outside.write_text(Structure(Lattice.cubic(5.6), ["Na", "Cl"], [[0, 0, 0], [.5, .5, .5]]).to(fmt="cif"))
    folder = _trap_folder(runner.work, "out-link", lambda f: (f / "out.cif").symlink_to(outside))
    return runner.run("serialize", str(folder), timeout=60)


def case_dangling_and_looping_links(runner: Runner) -> dict:
    def trap(folder: Path):
        (folder / "dangling.cif").symlink_to(folder / "missing.cif")
        (folder / "loop.cif").symlink_to(folder / "loop.cif")
    return runner.run("serialize", str(_trap_folder(runner.work, "links", trap)), timeout=60)


def _cif_with(**values: str) -> str:
    lines = CUBIC_CIF.splitlines()
    for key, value in values.items():
        lines = [f"_cell_{key} {value}" if line.startswith(f"_cell_{key} ") else line for line in lines]
    return "\n".join(lines) + "\n"


def case_nan_cell(runner: Runner) -> dict:
    (runner.work / "nan.cif").write_text(_cif_with(length_a="nan"))
    return runner.run("symmetry", "nan.cif", timeout=60)


def case_huge_cell_pattern(runner: Runner) -> dict:
    huge = Structure(Lattice.cubic(1e6), ["Na", "Cl"], [[0, 0, 0], [.5, .5, .5]])
    (runner.work / "huge.cif").write_text(huge.to(fmt="cif"))
    return runner.run("generate", "--xrd", "huge.cif", "--formula", "NaCl", "--num", "1", "--out", "xrd",
                      timeout=180)


def case_negative_length(runner: Runner) -> dict:
    (runner.work / "negative.cif").write_text(_cif_with(length_a="-4.2"))
    result = runner.run("serialize", "negative.cif", "--out", "negative.txt", timeout=60)
    text = runner.work / "negative.txt"
    result["disk"] = text.read_text().splitlines()[1:3] if text.exists() else "no file"
    return result


# What serialize wrote before issue 39 for the CIF of case_close_atoms: two sites at one Wyckoff position.
CLOSE_TEXT = """data_CsNaCl
_space_group_name_H-M_alt Pm-3m
_cell_formula_units_Z 1
_cell_length_a 4.20
loop_
_atom_site_type_symbol
_atom_site_Wyckoff_symbol
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
Cs 1a . . .
Na 1b . . .
Cl 1b . . .
"""


def case_close_atoms(runner: Runner) -> dict:
    close = Structure(Lattice.cubic(4.2), ["Cs", "Cl", "Na"], [[0, 0, 0], [.5, .5, .5], [.5, .5, .5095]])  # 0.04 Å
    (runner.work / "close.cif").write_text(close.to(fmt="cif"))
    result = {"serialize": runner.run("serialize", "close.cif", "--out", "close.txt", timeout=60)}
    written = runner.work / "close.txt"
    result["serialize: on disk"] = written.read_text().splitlines()[-3:] if written.exists() else "no file"
    (runner.work / "two-on-one.txt").write_text(CLOSE_TEXT)
    result["to-cif"] = runner.run("to-cif", "two-on-one.txt", "--out", "close-out.cif", timeout=60)
    written = runner.work / "close-out.cif"
    if written.exists():
        try:
            structure = Structure.from_file(written)
            result["disk"] = f"close-out.cif: {len(structure)} sites, closest pair {_closest(structure):.3f} Å"
        except ValueError as error:  # two atoms on one point: pymatgen reads an occupancy of 2
            result["disk"] = f"close-out.cif written, unreadable by pymatgen ({error})"
    else:
        result["disk"] = "no CIF written"
    return result


def _closest(structure: Structure) -> float:
    return float(structure.distance_matrix[np.triu_indices(len(structure), 1)].min()) if len(structure) > 1 else 0.0


def _junk(runner: Runner) -> Path:
    junk = runner.work / "junk"
    junk.mkdir(exist_ok=True)
    (junk / "a.cif").write_text("hello")
    (junk / "b.cif").write_bytes(bytes(range(256)))
    (runner.work / "good.cif").write_text(CUBIC_CIF)
    return junk


def case_junk_reference_and_csp(runner: Runner) -> dict:
    junk = _junk(runner)
    (runner.work / "binary.bin").write_bytes(bytes(range(256)) * 4)
    return {"--reference binary": runner.run("evaluate", "good.cif", "--reference", "binary.bin", timeout=120),
            "--reference junk folder": runner.run("evaluate", "good.cif", "--reference", str(junk), timeout=120),
            "--csp junk folder": runner.run("evaluate", "good.cif", "--csp", str(junk), timeout=120)}


def case_embed_junk(runner: Runner) -> dict:
    junk = _junk(runner)
    result = runner.run("embed", str(junk), "--out", "junk.safetensors", timeout=180)
    written = runner.work / "junk.safetensors"
    if written.exists():
        from safetensors.numpy import load_file

        vectors = next(iter(load_file(written).values()))
        result["disk"] = f"junk.safetensors: {len(vectors)} rows, {int(np.isnan(vectors).all(axis=1).sum())} all NaN"
    else:
        result["disk"] = "nothing written"
    return result


def case_full_disk(runner: Runner) -> dict:
    disk = runner.work / "full"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(disk)], capture_output=True).returncode:
        return {"skipped": "mounting a small tmpfs needs root"}
    try:
        many = runner.work / "many"
        many.mkdir()
        for index in range(200):
            structure = Structure(Lattice.cubic(4.0 + index * 0.01), ["Cs", "Cl"], [[0, 0, 0], [.5, .5, .5]])
            (many / f"s{index:02d}.cif").write_text(structure.to(fmt="cif"))
        result = runner.run("serialize", str(many), "--out", str(disk / "texts.txt"), timeout=120)
        result["disk"] = ", ".join(f"{path.name} {path.stat().st_size} bytes" for path in disk.iterdir()) or "empty"
        return result
    finally:
        subprocess.run(["umount", str(disk)])


def case_ctrl_c(runner: Runner) -> dict:
    process = runner.start("generate", "--num", "400", "--seed", "0", "--out", "interrupted")
    _when_written(runner.work / "interrupted", 100, process)
    process.send_signal(signal.SIGINT)
    result = runner.finish(process, 60)
    result["disk"] = _journal(runner.work / "interrupted")
    return result


CASES = {name.removeprefix("case_"): case for name, case in globals().items() if name.startswith("case_")}


_SCRATCH = re.compile(r"/tmp/tmp\w+/")  # each case's scratch folder, left out of the table


def _cells(result: dict) -> list[tuple[str, str]]:
    """(what, outcome) lines of one case's result: each command's exit and lines, then what is on disk."""
    if "exit" in result:
        lines = " / ".join(f"`{_SCRATCH.sub('', line)}`" for line in (result["first_line"], result["last_line"])
                           if line)
        printed = f"{result['stderr_lines']} lines on stderr: {lines}" if lines else "nothing on stderr"
        cells = [("", f"exit {result['exit']}; {printed}; {result['stdout_lines']} lines out")]
    else:
        cells = []
        for key, value in result.items():
            if isinstance(value, dict) and "exit" in value:
                cells += [(key, text) for _, text in _cells(value)]
            elif key == "runs":
                cells += [(f"run {i + 1}", text) for i, run in enumerate(value) for _, text in _cells(run)]
    for key in ("after_kill", "serialize: on disk", "disk", "texts_equal_to_a_lone_run"):
        if key in result:
            cells.append((key.replace("_", " "), str(result[key])))
    return cells


def compare(before: Path, after: Path) -> str:
    """The Markdown table of two runs of the cases: per case and command, before and after."""
    old, new = json.loads(before.read_text()), json.loads(after.read_text())
    lines = ["| case | | before | after |", "|---|---|---|---|"]
    for name in new:
        old_cells, new_cells = dict(_cells(old.get(name, {}))), dict(_cells(new[name]))
        for what in dict.fromkeys(list(old_cells) + list(new_cells)):
            cells = (old_cells.get(what, "-"), new_cells.get(what, "-"))
            lines.append(f"| {name.replace('_', ' ')} | {what} | " + " | ".join(c.replace("|", "\\|") for c in cells)
                         + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, help="a checkout whose crystallm/ to run (default: the installed one)")
    parser.add_argument("--label", help="the name of this run's JSON file")
    parser.add_argument("--out", type=Path, help="folder of the JSON files")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"), help="print the Markdown "
                        "table of two runs' JSON files instead")
    args = parser.parse_args()
    if args.compare:
        print(compare(*args.compare))
        return
    if not (args.label and args.out):
        parser.error("--label and --out, or --compare")
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.cases:
        with tempfile.TemporaryDirectory() as scratch:
            started = time.perf_counter()
            results[name] = CASES[name](Runner(args.source and args.source.resolve(), Path(scratch)))
            results[name]["seconds"] = round(time.perf_counter() - started, 1)
            print(name, json.dumps(results[name], ensure_ascii=False), flush=True)
            shutil.rmtree(scratch, ignore_errors=True)
    path = args.out / f"{args.label}.json"  # cases run again replace theirs; the others stay
    earlier = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({name: results.get(name, earlier.get(name)) for name in CASES
                                if name in results or name in earlier}, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
