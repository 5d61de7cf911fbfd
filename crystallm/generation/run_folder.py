"""The output folder of `crystallm generate`, written as samples come and resumable.

    samples.jsonl     the journal: one line per finished sample (final text, the LM's text if refinement or
                      symmetrization changed it, prompt, tokens, seconds); the truth
    cifs.zip          standard CIFs (pymatgen's CifWriter, P1 setting of the conventional cell): VESTA, ASE read them
    structures.extxyz the same structures for ASE
    summary.csv       one row per sample: formula, stated and detected space group, parse and validity flags
    summary.json      counts and rates (the `crystallm evaluate` summary) plus generation speed; uniqueness
                      (pairwise matching) is added when the run ends
    run.json          the run's description, its sampling settings (`SamplingSettings`) and the fingerprint of
                      the model's weights; `--resume` continues only a run with the same settings and weights

The journal is appended and synced first; the other files are rewritten atomically (a copy is appended to and
moved into place), so killing the process at any moment leaves every finished structure readable, and a
resumed run rebuilds them from the journal.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import os
import shutil
import socket
import time
from pathlib import Path

import torch
from pymatgen.core import Structure
from tqdm import tqdm

from crystallm.errors import CrystaLLMInputError, OutputWriteError
from crystallm.evaluation import metrics, readers, reports, scoring
from crystallm.evaluation.scoring import ScoredStructure
from crystallm.generation.prompt import Prompt
from crystallm.generation.sampling import GeneratedSample, generate_structures
from crystallm.generation.settings import SamplingSettings
from crystallm.io import cif, text_format

CSV_COLUMNS = ("name", "prompt", "formula", "n_atoms", "stated_space_group", "space_group", "parsed",
               "structural_valid", "compositional_valid", "valid", "p1", "formula_consistent", "tokens", "seconds",
               "error")


class GenerationFolder:
    """Open `directory` for a run drawn with `sampling`, described by `run` (a JSON-able dict: the model, the
    prompt, `num`, ...); with `resume`, continue the run already there (its sampling settings and description must
    match, except `num`).

    >>> import tempfile
    >>> folder = GenerationFolder(tempfile.mkdtemp(), SamplingSettings(), {"num": 2})
    >>> folder.finished, folder.settings["sampling"]["seed"]
    (0, 0)
    """

    def __init__(self, directory: str | Path, sampling: SamplingSettings, run: dict | None = None,
                 resume: bool = False):
        self.directory = Path(directory)
        self.sampling = sampling
        self.run = {**(run or {}), "format_version": text_format.FORMAT_VERSION}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock = _take_lock(self.directory)  # before anything is written: one writer a folder
        except OSError as error:
            raise CrystaLLMInputError(f"{self.directory}: cannot write there ({error.strerror or error})") from None
        self.journal = self.directory / "samples.jsonl"
        self.records: list[dict] = []
        self.entries: list[dict] = []
        self.weights: str | None = None  # the fingerprint of the weights that wrote the samples there
        if self.journal.exists() and self.journal.stat().st_size:
            if not resume:
                raise CrystaLLMInputError(f"{self.directory} already holds a run; pass --resume to continue it "
                                          f"or choose another --out")
            path = self.directory / "run.json"
            stored = json.loads(path.read_text()) if path.exists() else {}
            self.weights = stored.pop("weights", None)
            self._check_settings(stored)
            self._rebuild()
        else:
            for name in ("cifs.zip", "structures.extxyz", "summary.csv", "summary.json"):
                (self.directory / name).unlink(missing_ok=True)
        # the weights that wrote the samples stay recorded until `check_weights` meets the next model
        reports.write_json({**self.settings, **({"weights": self.weights} if self.weights else {})},
                           self.directory / "run.json")

    @classmethod
    def from_run_json(cls, directory: str | Path, run_json: dict, resume: bool = False) -> GenerationFolder:
        """The folder of a run described by a `run.json`'s contents (`settings`, without the weights)."""
        run = {key: value for key, value in run_json.items() if key not in ("sampling", "format_version")}
        return cls(directory, SamplingSettings.from_dict(run_json.get("sampling", {})), run, resume)

    def close(self) -> None:
        """End this object's hold on the folder (its writer lock); the process ending does the same."""
        self._lock.close()

    def __enter__(self) -> GenerationFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def settings(self) -> dict:
        """What run.json holds besides the weights: the run's description and its sampling settings."""
        return {**self.run, "sampling": self.sampling.to_dict()}

    @property
    def finished(self) -> int:
        """How many samples are on disk."""
        return len(self.entries)

    def check_weights(self, fingerprint: str) -> None:
        """Record the fingerprint (`weights_fingerprint`) of the model about to write here; samples already there
        from other weights (the same settings, another model: a retrained default) are refused, not mixed, and
        so are samples whose weights were never recorded (a folder written before crystallm recorded them)."""
        if self.finished and self.weights is None:
            raise CrystaLLMInputError(f"{self.directory}: its samples do not record the weights that wrote them "
                                      f"(written by an older crystallm), so --resume cannot tell whether this "
                                      f"model did; choose another --out")
        if self.finished and self.weights != fingerprint:
            raise CrystaLLMInputError(f"{self.directory}: --resume needs the model that wrote the samples there "
                                      f"(weights {self.weights}, now {fingerprint}); choose another --out")
        self.weights = fingerprint
        reports.write_json({**self.settings, "weights": fingerprint}, self.directory / "run.json")

    def _check_settings(self, stored: dict) -> None:
        before, now = _flat(stored), _flat(self.settings)
        differ = [key for key in set(before) | set(now) if key != "num" and before.get(key) != now.get(key)]
        if differ:
            key = sorted(differ)[0]
            raise CrystaLLMInputError(f"{self.directory}: --resume needs the settings of the run there; {key} was "
                                      f"{before.get(key)!r}, now {now.get(key)!r}")

    def _rebuild(self) -> None:
        """Read the journal (a last line cut by a kill is dropped) and rewrite every other file from it."""
        lines = self.journal.read_bytes().split(b"\n")
        entries = []
        for line in lines:
            try:
                entries.append(json.loads(line))
            except ValueError:
                break  # an unfinished last line
        kept = b"".join(line + b"\n" for line in lines[:len(entries)])
        reports.replace_file(self.journal, kept)
        for name in ("cifs.zip", "structures.extxyz", "summary.csv", "summary.json"):
            (self.directory / name).unlink(missing_ok=True)
        self._append_outputs(entries)

    def write(self, samples: list[GeneratedSample], names: list[str] | None = None) -> None:
        """Add finished samples: the journal first (synced), then CIFs, extxyz, CSV and the summary."""
        entries = [{"index": s.index, "name": name, "prompt": s.prompt.describe(), "text": s.output_text,
                    "tokens": s.tokens, "seconds": s.seconds}
                   | ({"fallbacks": s.fallbacks, "resamples": s.resamples} if s.fallbacks or s.resamples else {})
                   | ({"lm_text": s.text, "refine_seconds": s.refine_seconds} if s.final_text else {})
                   for s, name in zip(samples, names or [f"sample-{s.index:06d}" for s in samples])]
        try:
            with open(self.journal, "a") as handle:
                handle.write("".join(json.dumps(entry) + "\n" for entry in entries))
                handle.flush()
                os.fsync(handle.fileno())
            self._append_outputs(entries)
        except OSError as error:
            raise OutputWriteError(f"{self.directory}: cannot write ({error.strerror or error}); the "
                                   f"{self.finished} structures finished before are kept there: free space and run "
                                   f"again with --resume") from error

    def _append_outputs(self, entries: list[dict]) -> None:
        records = [scoring.score_entry(readers.Entry(e["name"], "text", e["text"])) for e in entries]
        structures = {e["name"]: r.structure for e, r in zip(entries, records) if not r.error}
        _append_copy(self.directory / "cifs.zip", lambda path: cif.write_cif_zip(path, structures, "a"))
        _append_copy(self.directory / "structures.extxyz", lambda path: _add_frames(path, structures))
        _append_copy(self.directory / "summary.csv", lambda path: _add_rows(path, entries, records))
        self.entries += entries
        self.records += records
        reports.write_json(self.summary(uniqueness=False), self.directory / "summary.json")

    def valid_structures(self) -> list[tuple[str, Structure]]:
        """(name, structure) of the samples on disk that are structurally valid (the ones worth relaxing)."""
        return [(entry["name"], record.structure) for entry, record in zip(self.entries, self.records)
                if not record.error and record.structural_valid]

    def finish(self) -> dict:
        """The complete summary (uniqueness included), written to summary.json and returned."""
        summary = self.summary()
        reports.write_json(summary, self.directory / "summary.json")
        return summary

    def summary(self, uniqueness: bool = True) -> dict:
        """Counts and rates of the samples so far and generation speed (`evaluation.metrics`)."""
        summary = metrics.summarize(metrics.MetricInputs(self.records, journal=self.entries, uniqueness=uniqueness))
        summary["requested"] = self.run.get("num")
        summary["settings"] = self.settings
        return summary


def _take_lock(directory: Path):
    """The folder's writer lock: `.lock`, held (flock) by the open handle returned, so it ends with the folder
    object or the process, kill -9 included. A folder another writer holds raises CrystaLLMInputError naming it."""
    handle = open(directory / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise CrystaLLMInputError(f"{directory}: another run is writing there ({holder}); wait for it to end or "
                                  f"choose another --out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle


def _flat(settings: dict) -> dict:
    """A run.json's settings with the sampling settings as `sampling.<name>` keys (so a difference names one)."""
    return {key: value for key, value in settings.items() if key != "sampling"} | \
        {f"sampling.{key}": value for key, value in settings.get("sampling", {}).items()}


def _csv_row(entry: dict, record: ScoredStructure) -> dict:
    parsed = not record.error
    blank = lambda value: "" if value is None or not parsed else value  # noqa: E731  (an unscored row is empty)
    return {"name": entry["name"], "prompt": entry["prompt"], "formula": record.formula,
            "n_atoms": blank(record.n_atoms), "stated_space_group": blank(record.stated_space_group),
            "space_group": blank(record.space_group_0_1), "parsed": parsed,
            "structural_valid": record.structural_valid, "compositional_valid": record.compositional_valid,
            "valid": record.valid, "p1": record.space_group_0_1 == 1 if parsed else "",
            "formula_consistent": blank(record.formula_consistent), "tokens": entry["tokens"],
            "seconds": round(entry["seconds"], 4), "error": record.error}


def _add_rows(path: Path, entries: list[dict], records: list[ScoredStructure]) -> None:
    new = not path.exists() or not path.stat().st_size
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, CSV_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(_csv_row(e, r) for e, r in zip(entries, records))


def _add_frames(path: Path, structures: dict) -> None:
    from ase.io import write
    from pymatgen.io.ase import AseAtomsAdaptor

    buffer = io.StringIO()
    for name, structure in structures.items():
        atoms = AseAtomsAdaptor.get_atoms(structure)
        atoms.info["name"] = name
        write(buffer, atoms, format="extxyz")
    with open(path, "a") as handle:
        handle.write(buffer.getvalue())


def _append_copy(path: Path, append) -> None:
    """Append to a copy of `path` and move it into place: the file on disk is always whole."""
    scratch = path.with_name(path.name + ".partial")
    try:
        if path.exists():
            shutil.copyfile(path, scratch)
        else:
            scratch.unlink(missing_ok=True)
        append(scratch)
        os.replace(scratch, path)
    except OSError:
        scratch.unlink(missing_ok=True)  # the whole file stays as it was
        raise


def shard_directory(directory: str | Path, shard: tuple[int, int]) -> Path:
    """The folder of shard i of n inside a run's folder: a generation folder of its own (journal, resume).

    >>> str(shard_directory("out", (1, 4)))
    'out/shard-1-of-4'
    """
    return Path(directory) / f"shard-{shard[0]}-of-{shard[1]}"


def merge_shards(directory: str | Path) -> GenerationFolder:
    """Merge the complete shard folders `directory/shard-i-of-n` into one generation folder at `directory`, the
    samples in index order: the same texts as the run made by one process. Raises CrystaLLMInputError, naming
    what is missing, when a shard is absent or unfinished or the shards' settings differ. The shards are kept.

    >>> merge_shards("no-such-run")
    Traceback (most recent call last):
    ...
    crystallm.errors.CrystaLLMInputError: no-such-run: no shard folders (shard-I-of-N) to merge
    """
    directory = Path(directory)
    found = sorted(directory.glob("shard-*-of-*"))
    if not found:
        raise CrystaLLMInputError(f"{directory}: no shard folders (shard-I-of-N) to merge")
    count = int(found[0].name.rsplit("-", 1)[1])
    settings, entries = None, []
    for index in range(count):
        path = shard_directory(directory, (index, count))
        if not (path / "run.json").exists():
            raise CrystaLLMInputError(f"{path}: shard {index} of {count} is missing; run it with "
                                      f"--shard {index}/{count}")
        shard_settings = {k: v for k, v in json.loads((path / "run.json").read_text()).items() if k != "shard"}
        if settings is not None and shard_settings != settings:
            raise CrystaLLMInputError(f"{path}: its settings differ from shard 0's; shards of one run share them")
        settings = shard_settings
        entries += reports.read_json_lines(path / "samples.jsonl")
    missing = sorted(set(range(settings["num"])) - {e["index"] for e in entries})
    if missing:
        raise CrystaLLMInputError(f"{directory}: {len(missing)} samples are not generated yet (e.g. index "
                                  f"{missing[0]}); finish every shard (run it again with --resume) and merge again")
    for name in ("samples.jsonl", "cifs.zip", "structures.extxyz", "summary.csv", "summary.json"):
        (directory / name).unlink(missing_ok=True)  # merging again writes the merged run anew
    merged = GenerationFolder.from_run_json(directory, {k: v for k, v in settings.items() if k != "weights"})
    if settings.get("weights"):
        merged.check_weights(settings["weights"])
    ordered = sorted(entries, key=lambda e: e["index"])
    reports.write_json_lines(ordered, merged.journal)
    merged._append_outputs(ordered)
    merged.finish()
    return merged


def weights_fingerprint(model) -> str:
    """The first 16 hex digits of a SHA-256 over the model's state dict (names and bytes): what tells two
    models' samples apart where the settings name both "default". Adapters loaded but not active (PEFT names
    each adapter's weights after it) do not count: loading another one does not change what generates.

    >>> import torch
    >>> weights_fingerprint(torch.nn.Linear(2, 2)) == weights_fingerprint(torch.nn.Linear(2, 2))
    False
    """
    loaded = set(getattr(model, "peft_config", None) or {})
    active = getattr(model, "active_adapters", None) if loaded else None  # a method on transformers' models
    inactive = loaded - set((active() if callable(active) else active) or [])
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if any(f".{adapter}." in f"{name}." for adapter in inactive):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def generate_into(folder: GenerationFolder, model, tokenizer, prompts: Prompt | list[Prompt] | None, num: int,
                  names: list[str] | None = None, progress: bool = True, shard: tuple[int, int] = (0, 1)) -> dict:
    """Generate the samples the folder does not hold yet, drawn with the folder's sampling settings (see
    `generate_structures` for the arguments), writing each batch as it finishes, with a progress bar in
    structures/s; returns the complete summary. With `shard` (i, n) the folder holds only shard i's batches
    (`merge_shards` joins the n folders).

    >>> import tempfile
    >>> from crystallm.generation import load_generator
    >>> model, tokenizer = load_generator()
    >>> folder = GenerationFolder(tempfile.mkdtemp(), SamplingSettings(), {"num": 2})
    >>> summary = generate_into(folder, model, tokenizer, None, num=2, progress=False)
    >>> summary["entries"], summary["parse_rate"]
    (2, 1.0)
    """
    folder.check_weights(weights_fingerprint(model))
    batch_size = folder.sampling.batch_size
    index, count = shard
    # This shard's batches are index, index + count, ...: those done are whole batches, so the next one to do is
    # the (done + 1)-th of them.
    start = (index + count * (folder.finished // batch_size)) * batch_size
    owned = sum(min(batch_size, num - first) for first in range(index * batch_size, num, count * batch_size))
    samples = generate_structures(model, tokenizer, prompts, num=num, settings=folder.sampling, start=start,
                                  shard=shard)
    with tqdm(total=owned, initial=min(folder.finished, owned), desc="generating", unit=" structures",
              disable=not progress) as bar:
        batch: list[GeneratedSample] = []
        # A run that ended on a short batch and is resumed with a larger `num` draws that batch again, whole (each
        # batch is seeded as one); the samples already held are kept, not written twice.
        held = {entry["index"] for entry in folder.entries}
        for sample in samples:
            if sample.index not in held:
                batch.append(sample)
            if (sample.index + 1) % batch_size == 0 or sample.index == num - 1:
                folder.write(batch, [names[s.index] for s in batch] if names else None)
                bar.update(len(batch))
                batch = []
    return folder.finish()
