"""Readers of structure collections: a zip or folder of CIFs, an extxyz file, a CSV with a `cif` or `text`
column, the output folder of `crystallm generate`, or a benchmark split by name. Each yields `Entry` items,
turned into structures when they are scored (in worker processes)."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import itertools
import sys
import zipfile
from pathlib import Path
from typing import Iterator

from crystallm import data
from crystallm.errors import CrystaLLMInputError
from crystallm.evaluation import reports
from crystallm.io.files import InputPolicy, check_file, folder_files, read_bytes

CIF_SUFFIXES = (".cif", ".mcif")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One item of an input collection: its name and a payload to turn into a structure."""

    name: str
    kind: str  # "cif", "text" (crystallm text) or "structure" (a pymatgen Structure)
    payload: object


def iter_entries(source: str | Path, skipped: list[str] | None = None,
                 policy: InputPolicy = InputPolicy()) -> Iterator[Entry]:
    """Entries of a zip of CIFs, a folder of CIFs, an extxyz file, a CSV with a `cif` or `text` column, the
    output folder of `crystallm generate` (the texts of its journal), or a benchmark split such as `mp20-bt/test`.

    In a zip or a folder only `.cif`/`.mcif` files are structures; the names of the other files (a README, a
    license) are appended to `skipped`, not scored, and so are the entries the input `policy` refuses, each with
    its reason (`io.files.check_file`: links out of the folder, pipes and devices, oversized files). A file that is
    not a readable zip raises CrystaLLMInputError.

    >>> next(iter_entries("mp20-bt/test")).name
    'mp-10009'
    >>> skipped = []
    >>> len(list(iter_entries(Path(__file__).parents[2] / "examples", skipped))), skipped
    (4, ['README.md'])
    """
    skipped = [] if skipped is None else skipped
    path = Path(source)
    if not path.exists():
        benchmark, _, split = str(source).partition("/")
        if benchmark in data.BENCHMARKS and split in ("train", "test"):
            dataset = data.load_split(benchmark, split)
            for row_id, cif in zip(dataset["id"], dataset["cif"]):
                yield Entry(row_id, "cif", cif)
            return
        raise FileNotFoundError(f"{source}: no such file or folder, and not a benchmark split "
                                f"({', '.join(f'{b}/test' for b in data.BENCHMARKS)})")
    if path.is_dir():
        if (path / "samples.jsonl").exists():  # a generate folder: its journal holds every sample's text
            for sample in reports.read_json_lines(path / "samples.jsonl"):
                yield Entry(sample["name"], "text", sample["text"])
            return
        readable, refused, others = folder_files(path, CIF_SUFFIXES, policy)
        skipped += others + [f"{entry.name} ({entry.reason})" for entry in refused]
        for file in readable:
            yield Entry(file.name, "cif", read_bytes(file, path, policy))
        return
    suffixes = "".join(path.suffixes).lower()
    if suffixes.endswith((".zip", ".extxyz", ".xyz", ".csv", ".csv.gz")):  # collections: any size, regular files only
        reason = check_file(path, policy=dataclasses.replace(policy, max_bytes=sys.maxsize))
        if reason:
            raise CrystaLLMInputError(f"{path}: {reason}")
    if suffixes.endswith(".zip"):
        try:
            archive = zipfile.ZipFile(path)
        except zipfile.BadZipFile as error:
            raise CrystaLLMInputError(f"{path}: not a readable zip archive ({error})") from None
        with archive:
            for info in archive.infolist():
                if info.is_dir():
                    continue
                if info.file_size > policy.max_bytes:  # a zip bomb unpacks to far more than it holds
                    skipped.append(f"{info.filename} ({info.file_size:,} bytes unpacked, more than the limit of "
                                   f"{policy.max_bytes:,}; --max-file-mb)")
                elif Path(info.filename).suffix.lower() in CIF_SUFFIXES and not info.filename.startswith("__MACOSX/"):
                    yield Entry(info.filename, "cif", archive.read(info))
                else:
                    skipped.append(info.filename)
    elif suffixes.endswith((".extxyz", ".xyz")):
        yield from _extxyz_entries(path)
    elif suffixes.endswith((".csv", ".csv.gz")):
        yield from _csv_entries(path)
    else:
        yield Entry(path.name, "cif", read_bytes(path, policy=policy))


def _extxyz_entries(path: Path) -> Iterator[Entry]:
    from ase.io import iread
    from pymatgen.io.ase import AseAtomsAdaptor

    frames = iread(str(path), index=":", format="extxyz")
    for index in itertools.count():
        try:
            atoms = next(frames)
        except StopIteration:
            return
        except Exception as error:  # ase raises what its parser meets: ValueError, KeyError, IndexError, ...
            raise CrystaLLMInputError(f"{path}: frame {index} is not extended XYZ ({error})") from None
        yield Entry(atoms.info.get("name", f"{path.name}#{index}"), "structure", AseAtomsAdaptor.get_structure(atoms))


def _csv_entries(path: Path) -> Iterator[Entry]:
    csv.field_size_limit(1 << 30)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        kind = "text" if "text" in columns else "cif" if "cif" in columns else None
        if kind is None:
            raise CrystaLLMInputError(f"{path}: a CSV needs a 'cif' or 'text' column, found {columns}")
        key = next((c for c in ("id", "material_id", "name") if c in columns), None)
        for index, row in enumerate(reader):
            yield Entry(row[key] if key else f"{path.name}#{index}", kind, row[kind])
