"""The datasets of ../shared/data through HF `datasets`: sources, benchmark splits, the pretraining corpus.

Every source loads as a `datasets.Dataset` with columns `id`, `source`, `cif` and its property
columns (units in `PROPERTY_UNITS`). The pretraining corpus (docs/architecture.md) is every source
except the test splits, serialized, deduplicated and passed through the leakage guard.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import multiprocessing
import os
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from pymatgen.analysis.structure_matcher import StructureMatcher

from crystallm import symmetry, tokenization
from crystallm.diffraction import patterns
from crystallm.diffraction.patterns import Peaks
from crystallm.errors import CrystaLLMInputError
from crystallm.io import round_trip, text_format

PROPERTY_UNITS = {
    "formation_energy_per_atom": "eV/atom",
    "band_gap": "eV",
    "e_above_hull": "eV/atom",
    "energy_per_atom": "eV/atom",
    "heat_all": "eV/atom",
    "heat_ref": "eV/atom",
    "dir_gap": "eV",
    "ind_gap": "eV",
    "bulk_modulus": "GPa",
    "shear_modulus": "GPa",
    "debye_temperature": "K",
    "thermal_conductivity": "W/(m K)",
    "thermal_expansion": "1/K",
}


@dataclass(frozen=True)
class Source:
    """One CSV file of ../shared/data."""

    name: str  # e.g. "mp_20_biternary/test"
    path: str  # relative to the data directory
    id_column: str | None  # None: ids are made from the source name and row number
    properties: tuple[str, ...]
    renames: tuple[tuple[str, str], ...] = ()  # (column in the file, our name)


_MP = ("formation_energy_per_atom", "band_gap", "e_above_hull")
_PEROV = ("heat_all", "heat_ref", "dir_gap", "ind_gap")
_AFLOW = ("bulk_modulus", "shear_modulus", "debye_temperature", "thermal_conductivity", "thermal_expansion")

SOURCES: dict[str, Source] = {source.name: source for source in [
    Source("mp_20_biternary/val", "mp_20_biternary/val.csv.gz", "material_id", _MP),
    Source("mp_20_biternary/test", "mp_20_biternary/test.csv.gz", "material_id", _MP),
    Source("mp_20_subset_slices/all", "mp_20_subset_slices/raw_mp20_dataset_mini.csv", "material_id", _MP),
    *(Source(f"mpts_52/{split}", f"mpts_52/{split}.csv.gz", "material_id",
             ("e_above_hull", "formation_energy_per_atom"), (("energy_above_hull", "e_above_hull"),))
      for split in ("val", "test")),
    *(Source(f"perov_5/{split}", f"perov_5/{split}.csv", "material_id", _PEROV) for split in ("val", "test")),
    *(Source(f"perov_5_dev/{split}", f"perov_5_dev/{split}.csv", "material_id", _PEROV)
      for split in ("train", "val", "test")),
    *(Source(f"carbon_24/{split}", f"carbon_24/{split}.csv", "material_id", ("energy_per_atom",))
      for split in ("val", "test")),
    Source("wbm/val", "wbm/val.csv.gz", None, ("formation_energy_per_atom", "band_gap")),
    # The Materials Project 2025.02 (no property columns): at most 20 atoms, and 21-52 atoms.
    Source("mp_2025/le20", "mp_2025/le20.csv.gz", "material_id", ()),
    Source("mp_2025/le52", "mp_2025/le52.csv.gz", "material_id", ()),
    *(Source(f"aflow/{prop}/{split}", f"aflow/{prop}/{split}.csv.gz", None, (prop,))
      for prop in _AFLOW for split in ("train", "val", "test")),
]}

# docs/architecture.md: the benchmark splits are ours (the full MP-20 train split is not available here).
BENCHMARKS: dict[str, dict[str, tuple[str, ...]]] = {
    "mp20-bt": {"train": ("mp_20_biternary/val",), "test": ("mp_20_biternary/test",)},
    "perov-5": {"train": ("perov_5_dev/train", "perov_5/val"), "test": ("perov_5/test",)},
    "carbon-24": {"train": ("carbon_24/val",), "test": ("carbon_24/test",)},
    "mpts-52": {"train": ("mpts_52/val",), "test": ("mpts_52/test",)},
}

# Every test split: the benchmarks', perov_5_dev/test (a subset of perov_5/test), and AFLOW's (kept
# for evaluating property predictors). None of these may reach the pretraining corpus.
TEST_SOURCES: tuple[str, ...] = (
    *(name for benchmark in BENCHMARKS.values() for name in benchmark["test"]),
    "perov_5_dev/test",
    *(f"aflow/{prop}/test" for prop in _AFLOW),
)
CORPUS_SOURCES: tuple[str, ...] = tuple(name for name in SOURCES if name not in TEST_SOURCES)
# Ids no training set may hold (the MP-40 test split), beside the test splits' own ids.
HOLDOUT_IDS = "mp_2025/holdout-ids.txt"


def data_dir() -> Path:
    """The shared data directory: $CRYSTALLM_DATA, else ../shared/data beside the checkout.

    >>> (data_dir() / "README.md").exists()
    True
    """
    candidates = [os.environ.get("CRYSTALLM_DATA"),
                  Path(__file__).resolve().parents[2] / "shared" / "data",
                  Path.cwd().parent / "shared" / "data",
                  Path.cwd() / "shared" / "data"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "README.md").exists():
            return Path(candidate)
    raise FileNotFoundError("the shared data directory was not found; set CRYSTALLM_DATA to the folder that "
                            "holds mp_20_biternary/, perov_5/, ... (../shared/data beside the checkout)")


def load_source(name: str) -> datasets.Dataset:
    """One source as a Dataset with columns id, source, cif and its properties.

    >>> ds = load_source("mp_20_biternary/test")
    >>> ds.num_rows, ds.column_names
    (7118, ['id', 'source', 'cif', 'formation_energy_per_atom', 'band_gap', 'e_above_hull'])
    """
    try:
        source = SOURCES[name]
    except KeyError:
        raise KeyError(f"unknown data source {name!r}; known: {', '.join(SOURCES)}") from None
    path = data_dir() / source.path
    dataset = datasets.load_dataset("csv", data_files=str(path), split="train")
    for old, new in source.renames:
        dataset = dataset.rename_column(old, new)
    if source.id_column is None:
        ids = [f"{name}#{row}" for row in range(dataset.num_rows)]
    else:
        prefix = "perov-" if name.startswith("perov") else ""
        ids = [f"{prefix}{value}" for value in dataset[source.id_column]]
    keep = ["cif", *source.properties]
    dataset = dataset.select_columns(keep)
    dataset = dataset.add_column("source", [name] * dataset.num_rows).add_column("id", ids)
    return dataset.select_columns(["id", "source", *keep])


def load_split(benchmark: str, split: str) -> datasets.Dataset:
    """A benchmark split of docs/architecture.md, e.g. load_split("mp20-bt", "test").

    >>> load_split("mp20-bt", "train").num_rows
    7140
    """
    try:
        names = BENCHMARKS[benchmark][split]
    except KeyError:
        raise KeyError(f"unknown split {benchmark}/{split}; benchmarks: {', '.join(BENCHMARKS)}, "
                       "splits: train, test") from None
    parts = [load_source(name) for name in names]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(
        [part.select_columns(["id", "source", "cif"]) for part in parts])


def format_fingerprint(*extra: str) -> str:
    """A hash of the code that writes and tokenizes texts, for `datasets` cache keys: datasets hashes a
    mapped function by reference, so without this an edit of the format could serve stale cached texts."""
    digest = hashlib.sha256()
    for module in (text_format, symmetry, tokenization, round_trip):
        digest.update(Path(module.__file__).read_bytes())
    for part in extra:
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def _serialize_rows(batch: dict) -> dict:
    results = [text_format.serialize_one(cif, f"{source} {id_}")
               for cif, source, id_ in zip(batch["cif"], batch["source"], batch["id"])]
    return {"text": [r.text or "" for r in results], "error": [r.error or "" for r in results]}


def serialize_dataset(dataset: datasets.Dataset, num_proc: int | None = None) -> datasets.Dataset:
    """Add `text` (crystallm text, "" on failure) and `error` columns; datasets caches the result."""
    return dataset.map(_serialize_rows, batched=True, batch_size=64, num_proc=num_proc, desc="serializing",
                       new_fingerprint=format_fingerprint("serialize", dataset._fingerprint))


def _hard_view_rows(batch: dict, seed: int) -> dict:
    return {"view": [text_format.hard_view(text, np.random.default_rng([seed, zlib.crc32(text.encode())]))
                     for text in batch["text"]]}


def add_hard_views(dataset: datasets.Dataset, seed: int = 0, num_proc: int | None = None) -> datasets.Dataset:
    """Add a `view` column: each text's hard view (`text_format.hard_view`), drawn from (seed, text), for the
    contrastive objective. About 15 ms a text; `datasets` caches the result, so a resumed or repeated training
    run makes them once (31k corpus texts: about 8 minutes in one process).

    >>> texts = datasets.Dataset.from_dict({"text": load_texts("data/test-sets.csv.gz")["text"][:2]})
    >>> [view != text for view, text in zip(add_hard_views(texts)["view"], texts["text"])]
    [True, True]
    """
    return dataset.map(_hard_view_rows, batched=True, batch_size=64, num_proc=num_proc, desc="hard views",
                       fn_kwargs={"seed": seed},
                       new_fingerprint=format_fingerprint("hard-views", str(seed), dataset._fingerprint))


def _description_rows(batch: dict) -> dict:
    return {"descriptions": [text_format.equivalent_texts(text) for text in batch["text"]]}


def add_descriptions(dataset: datasets.Dataset, num_proc: int | None = None) -> datasets.Dataset:
    """Add a `descriptions` column: every text the format allows for each crystal (`text_format.equivalent_texts`,
    the canonical one among them), for pretraining on equivalent serializations instead of repeating the corpus
    verbatim. About 11 ms a text (a median of 4 a crystal, never 1 in a sample of 300 corpus texts); `datasets`
    caches the result.

    >>> texts = datasets.Dataset.from_dict({"text": load_texts("data/test-sets.csv.gz")["text"][:2]})
    >>> [text in row["descriptions"] and len(row["descriptions"]) > 1 for text, row in zip(texts["text"],
    ...                                                                                   add_descriptions(texts))]
    [True, True]
    """
    return dataset.map(_description_rows, batched=True, batch_size=64, num_proc=num_proc, desc="descriptions",
                       new_fingerprint=format_fingerprint("descriptions", dataset._fingerprint))


def _diffraction_rows(batch: dict) -> dict:
    rows = [Peaks.from_structure(text_format.parse_structure(text)).to_row() for text in batch["text"]]
    return {key: [row[key] for row in rows] for key in ("peak_two_theta", "peak_intensity", "peak_direction")}


def add_diffraction_peaks(dataset: datasets.Dataset, num_proc: int | None = None) -> datasets.Dataset:
    """Add each text's computed Cu Kα powder peaks (`diffraction.patterns.Peaks`, read back with
    `Peaks.from_row`), for the pattern adapter. About 20 ms a text; `datasets` caches the result.

    >>> texts = datasets.Dataset.from_dict({"text": load_texts("data/test-sets.csv.gz")["text"][:2]})
    >>> [len(row["peak_two_theta"]) > 0 for row in add_diffraction_peaks(texts)]
    [True, True]
    """
    code = hashlib.sha256(Path(patterns.__file__).read_bytes()).hexdigest()  # a change there invalidates the cache
    return dataset.map(_diffraction_rows, batched=True, batch_size=64, num_proc=num_proc, desc="XRD peaks",
                       new_fingerprint=format_fingerprint("diffraction-peaks", code, dataset._fingerprint))


@dataclass(frozen=True)
class LeakageKey:
    """What two texts of one crystal share: DESIGN's (reduced formula, space group), plus Z and the
    multiset of site multiplicities per element, which cannot differ within one space group."""

    formula: str
    space_group: int
    formula_units: int
    multiplicities: tuple[tuple[str, int], ...]


def leakage_key(text: str) -> LeakageKey:
    """The matching key of a text; structures with different keys never match in the guard."""
    crystal = text_format.read_crystal_text(text)
    return LeakageKey(text_format.format_formula(crystal.formula), crystal.space_group, crystal.formula_units,
                      tuple(sorted((site.element, site.wyckoff.multiplicity) for site in crystal.sites)))


@dataclass(frozen=True)
class Leak:
    """A corpus candidate removed by the guard and why."""

    id: str
    source: str
    reason: str


def holdout_ids() -> frozenset[str]:
    """The material ids of `HOLDOUT_IDS` (one a line), which no training set may hold.

    >>> "mp-1172828" in holdout_ids(), len(holdout_ids())
    (True, 708)
    """
    return frozenset(read_ids(data_dir() / HOLDOUT_IDS))


def _structure_leaks(candidates: list[tuple[str, str, str]], by_key: dict[LeakageKey, list[tuple[str, str]]],
                     matcher: StructureMatcher) -> list[Leak]:
    parsed: dict[str, object] = {}

    def structure(text: str):
        if text not in parsed:
            parsed[text] = text_format.parse_structure(text)
        return parsed[text]

    leaks = []
    for candidate_id, source, text in candidates:
        for test_name, test_text in by_key.get(leakage_key(text), ()):
            if test_text == text or matcher.fit(structure(text), structure(test_text)):
                leaks.append(Leak(candidate_id, source, f"StructureMatcher match with {test_name}"))
                break
    return leaks


def find_leaks(candidates: Iterable[tuple[str, str, str]], tests: Iterable[tuple[str, str, str]],
               matcher: StructureMatcher | None = None, excluded_ids: dict[str, str] | None = None,
               num_proc: int | None = None) -> list[Leak]:
    """Candidates (id, source, text) that are in a test set (id, source, text), in input order.

    A candidate leaks if its material id is a test id (or a key of `excluded_ids`, whose value says where it
    is listed), or if it has a test structure's reduced formula and space group and pymatgen's StructureMatcher
    (default tolerances) matches the two. `num_proc` worker processes share the structure check.
    """
    matcher = matcher or StructureMatcher()
    excluded = dict(excluded_ids or {})
    by_key: dict[LeakageKey, list[tuple[str, str]]] = defaultdict(list)
    for test_id, test_source, text in tests:
        excluded[test_id] = test_source
        by_key[leakage_key(text)].append((f"{test_source} {test_id}", text))
    candidates = list(candidates)
    by_id = {(row[0], row[1]): Leak(row[0], row[1], f"material id is in {excluded[row[0]]}")
             for row in candidates if row[0] in excluded}
    rest = [row for row in candidates if (row[0], row[1]) not in by_id]
    workers = max(1, num_proc or 1)
    chunks = [rest[start::workers * 8] for start in range(workers * 8)] if workers > 1 else [rest]
    check = functools.partial(_structure_leaks, by_key=dict(by_key), matcher=matcher)
    if workers > 1:
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            found = [leak for leaks in pool.map(check, chunks) for leak in leaks]
    else:
        found = check(chunks[0])
    leaked = {**by_id, **{(leak.id, leak.source): leak for leak in found}}
    return [leaked[(row[0], row[1])] for row in candidates if (row[0], row[1]) in leaked]


def deduplicate(rows: Iterable[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """Keep the first row of each material id and of each text (the format is canonical, so one crystal
    seen in two sources has one text)."""
    seen_ids, seen_texts, kept = set(), set(), []
    for row in rows:
        row_id, _, text = row
        if row_id in seen_ids or text in seen_texts:
            continue
        seen_ids.add(row_id)
        seen_texts.add(text)
        kept.append(row)
    return kept


def tokenize_texts(dataset: datasets.Dataset, tokenizer, max_length: int | None = None,
                   num_proc: int | None = None) -> datasets.Dataset:
    """Token ids of each row's `text` with <bos> ... <eos>; cached by datasets like any map."""
    eos = tokenizer.eos_token

    def encode(batch):
        return tokenizer([text + eos for text in batch["text"]], truncation=max_length is not None,
                         max_length=max_length, return_attention_mask=False)

    return dataset.map(encode, batched=True, num_proc=num_proc, desc="tokenizing",
                       new_fingerprint=format_fingerprint("tokenize", dataset._fingerprint, str(max_length)))


@dataclass
class CorpusBuild:
    """The pretraining corpus and what building it removed, in the order it was removed."""

    corpus: list[tuple[str, str, str]]  # (id, source, text)
    tests: list[tuple[str, str, str]]  # every test split, serialized
    candidates: Counter  # rows serialized, by source
    leaks: list[Leak]  # by id (a test split's or HOLDOUT_IDS'), then by structure
    duplicates: Counter  # rows dropped as a repeat of an earlier row's id or text, by source
    failures: list[dict]  # rows that could not be serialized: id, source, error


def _serialized_rows(name: str, num_proc: int | None, failures: list[dict]) -> list[tuple[str, str, str]]:
    dataset = serialize_dataset(load_source(name).select_columns(["id", "source", "cif"]), num_proc)
    rows = []
    for row_id, text, error in zip(dataset["id"], dataset["text"], dataset["error"]):
        if error:
            failures.append({"id": row_id, "source": name, "error": error})
        else:
            rows.append((row_id, name, text))
    return rows


def build_pretraining_corpus(num_proc: int | None = None,
                             sources: tuple[str, ...] = CORPUS_SOURCES) -> CorpusBuild:
    """The corpus of `sources` (docs/format-and-tokenizer.md, "The corpus"): serialized; rows whose id is in a
    test split or in `HOLDOUT_IDS` dropped, then every row a StructureMatcher finds in a test set, then repeats
    of an earlier row's id or text (the sources' order decides which row stays).

    About 15 minutes on 2 cores for every source; `train/prepare_corpus.py` writes the result to files.
    """
    if leaked := set(sources) & set(TEST_SOURCES):
        raise ValueError(f"test splits cannot be corpus sources: {', '.join(sorted(leaked))}")
    failures: list[dict] = []
    tests = [row for name in TEST_SOURCES for row in _serialized_rows(name, num_proc, failures)]
    candidates = [row for name in sources for row in _serialized_rows(name, num_proc, failures)]
    leaks = find_leaks(candidates, tests, excluded_ids=dict.fromkeys(holdout_ids(), HOLDOUT_IDS),
                       num_proc=num_proc)
    leaked = {(leak.id, leak.source) for leak in leaks}
    clean = [row for row in candidates if (row[0], row[1]) not in leaked]
    corpus = deduplicate(clean)
    duplicates = Counter(source for _, source, _ in clean) - Counter(source for _, source, _ in corpus)
    return CorpusBuild(corpus, tests, Counter(source for _, source, _ in candidates), leaks, duplicates, failures)


def load_texts(path: str | Path, max_rows: int | None = None) -> datasets.Dataset:
    """A CSV of texts written by `train/prepare_corpus.py` (columns id, source, text); its first `max_rows` only
    when given.

    >>> corpus = "data/pretraining-corpus.csv.gz"
    >>> load_texts(corpus).column_names, load_texts(corpus, max_rows=3).num_rows
    (['id', 'source', 'text'], 3)
    """
    texts = datasets.load_dataset("csv", data_files=str(path), split="train", keep_default_na=False)
    return texts.select(range(min(len(texts), int(max_rows)))) if max_rows else texts


def read_ids(path: str | Path) -> list[str]:
    """Ids of a fixed benchmark subset or any id list, one a line (`../shared/benchmarks/*.txt`). A file that
    cannot be read, is not UTF-8 text or holds no id raises CrystaLLMInputError naming it.

    >>> read_ids(data_dir() / HOLDOUT_IDS)[:2]
    ['mp-1172828', 'mp-1172857']
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CrystaLLMInputError(f"{path}: not a UTF-8 text file of ids (one a line)") from None
    except OSError as error:
        raise CrystaLLMInputError(f"{path}: cannot read the ids ({error.strerror or error})") from None
    ids = [line.strip() for line in text.splitlines() if line.strip()]
    if not ids:
        raise CrystaLLMInputError(f"{path}: holds no ids (one a line)")
    return ids


def sample_texts(path: str | Path, source: str, rows: int, seed: int = 0) -> list[str]:
    """A seeded sample of `rows` texts of one source in a texts file (all of them where it has fewer), in file
    order.

    >>> texts = sample_texts("data/test-sets.csv.gz", "mp_20_biternary/test", 2000)
    >>> len(texts), texts == sample_texts("data/test-sets.csv.gz", "mp_20_biternary/test", 2000)
    (2000, True)
    """
    table = load_texts(path)
    texts = [text for text, name in zip(table["text"], table["source"]) if name == source]
    if not texts:
        raise ValueError(f"{path} holds no texts of {source!r}")
    keep = sorted(np.random.default_rng(seed).permutation(len(texts))[:rows])
    return [texts[index] for index in keep]


def labelled_texts(texts_path: str | Path, property_name: str, sources: tuple[str, ...] | None = None,
                   ) -> tuple[list[str], np.ndarray]:
    """Texts of a corpus file (`data/*.csv.gz`, columns id, source, text) with their value of a property, joined
    with the source files by id; rows without a finite value are left out.

    >>> texts, values = labelled_texts("data/test-sets.csv.gz", "band_gap", ("mp_20_biternary/test",))
    >>> len(texts), float(values.min()) >= 0
    (7118, True)
    """
    corpus = load_texts(texts_path)
    wanted = [name for name in dict.fromkeys(corpus["source"])
              if property_name in SOURCES[name].properties and (sources is None or name in sources)]
    value_of = {}
    for name in wanted:
        source = load_source(name)
        value_of.update({(name, row_id): value for row_id, value in zip(source["id"], source[property_name])})
    texts, values = [], []
    for row_id, name, text in zip(corpus["id"], corpus["source"], corpus["text"]):
        value = value_of.get((name, row_id))
        if value is not None and np.isfinite(value):
            texts.append(text)
            values.append(float(value))
    return texts, np.array(values)
