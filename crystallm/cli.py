"""The `crystallm` command line. Each subcommand is a thin wrapper over a library function.

Each subcommand imports the parts of the library it calls inside its function, so a command loads only its own
subsystem (training, design, the Hub, CHGNet, plotting), not all of them."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from crystallm import symmetry, validity
from crystallm.errors import CrystaLLMInputError, CrystaLLMWarning, InvalidStructureError, OutputWriteError
from crystallm.evaluation.readers import CIF_SUFFIXES
from crystallm.evaluation.relaxation import POTENTIALS, RelaxationSettings
from crystallm.io import cif, text_format
from crystallm.io.files import MAX_FILE_BYTES, InputPolicy, folder_files, read_bytes

if TYPE_CHECKING:
    from pymatgen.core import Structure


def _policy(args: argparse.Namespace) -> InputPolicy:
    return InputPolicy(follow_links=args.follow_links, max_bytes=int(args.max_file_mb * 1024 * 1024))


def _input_files(args: argparse.Namespace) -> tuple[list[Path], int]:
    """The CIF files named, folders expanded to the CIFs inside them (sorted), and how many entries were refused
    (each reported with its reason: `io.files.check_file`)."""
    files, refused = [], 0
    for path in args.inputs:
        if path.is_dir():
            readable, refusals, _ = folder_files(path, CIF_SUFFIXES, _policy(args))
            files += readable
            for entry in refusals:
                _report(str(path / entry.name), entry.reason)
            refused += len(refusals)
        else:
            files.append(path)
    return files, refused


def _read(path: Path, policy: InputPolicy = InputPolicy()) -> str:
    try:
        return read_bytes(path, policy=policy).decode()
    except (OSError, UnicodeDecodeError) as error:
        raise CrystaLLMInputError(f"{path}: cannot be read ({error})") from error


def _report(name: str, error: str) -> None:
    print(f"error: {name}: {error}", file=sys.stderr)


def cmd_serialize(args: argparse.Namespace) -> int:
    """CIF files -> crystallm text, one block each, blank line between; bad files reported, the rest written."""
    files, failed = _input_files(args)
    # A file is written whole or not at all: into a scratch file moved into place at the end.
    scratch = Path(f"{args.out}.partial") if args.out else None
    out = open(scratch, "w") if scratch else sys.stdout
    written = 0
    try:
        for path in files:
            try:
                structure = _valid_geometry(cif.structure_from_cif(_read(path, _policy(args)), str(path)), path)
                result = text_format.serialize_one(structure, str(path), args.symprec)
            except CrystaLLMInputError as error:
                result = text_format.SerializationResult(str(path), error=f"{type(error).__name__}: {error}")
            if result.error:
                failed += 1
                _report(str(path), result.error)
                continue
            try:
                out.write(f"{result.text}\n\n")
                out.flush()
            except OSError as error:
                raise OutputWriteError(f"{args.out or 'standard output'}: cannot write ({error.strerror or error}); "
                                       f"nothing written") from None
            written += 1
        if scratch and written:
            out.close()
            os.replace(scratch, args.out)
        elif scratch:
            _report(args.out, "no structure serialized; not written")
    finally:
        if scratch:
            with contextlib.suppress(OSError):  # closing flushes, and a full disk refuses that too
                out.close()
            scratch.unlink(missing_ok=True)
    return 1 if failed else 0


def _valid_geometry(structure: Structure, name: str | Path) -> Structure:
    """The structure, or InvalidStructureError where atoms sit closer than the validity floor (or the cell has no
    volume): written as it is, two atoms would lie on top of each other."""
    if not validity.structural_validity(structure):
        raise InvalidStructureError(f"{name}: atoms closer than {validity.MIN_DISTANCE} Å (the validity floor) or a "
                                    f"cell under {validity.MIN_VOLUME} Å³; not written")
    return structure


def _text_or_cif(path: Path) -> str:
    """crystallm text as it is; a CIF is serialized first."""
    content = _read(path)
    if text_format.is_crystal_text(content):
        return content.strip("\n")
    return text_format.serialize_structure(cif.structure_from_cif(content, str(path)))


def cmd_tokenize(args: argparse.Namespace) -> int:
    """Show the tokens of crystallm texts (or of CIFs, serialized first)."""
    from crystallm.tokenization import CrystaLLMTokenizer

    tokenizer = CrystaLLMTokenizer.from_format()
    failed = 0
    for path in args.inputs:
        try:
            text = _text_or_cif(path)
        except CrystaLLMInputError as error:
            failed += 1
            _report(str(path), f"{type(error).__name__}: {error}")
            continue
        ids = tokenizer(text)["input_ids"]
        tokens = tokenizer.convert_ids_to_tokens(ids)
        print(f"# {path}: {len(ids)} tokens (with <bos>)")
        print(" ".join(repr(token) for token in tokens))
    return 1 if failed else 0


def cmd_to_cif(args: argparse.Namespace) -> int:
    """crystallm text -> a standard CIF that VESTA, ASE and pymatgen read."""
    written = cif.structure_to_cif(_valid_geometry(text_format.parse_structure(_read(args.input)), args.input))
    if args.out:
        Path(args.out).write_text(written)
    else:
        print(written)
    return 0


def cmd_symmetry(args: argparse.Namespace) -> int:
    """Space group of each CIF at several tolerances."""
    files, failed = _input_files(args)
    tolerances = tuple(args.symprec)
    print("file\t" + "\t".join(f"symprec={t}" for t in tolerances))
    for path in files:
        try:
            structure = cif.structure_from_cif(_read(path, _policy(args)), str(path))
            found = symmetry.detect_space_groups(structure, tolerances)
        except CrystaLLMInputError as error:
            failed += 1
            _report(str(path), f"{type(error).__name__}: {error}")
            continue
        cells = [f"{symmetry.space_group_symbol(n)} ({n})" if n else "none" for n in found.values()]
        print(f"{path}\t" + "\t".join(cells))
    return 1 if failed else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score a collection of structures and print/write the set-level metrics."""
    from crystallm.data import read_ids
    from crystallm.evaluation import metrics, reports
    from crystallm.evaluation.batch import EvaluationOptions, evaluate
    from crystallm.evaluation.csp import CSPTask
    from crystallm.evaluation.relaxation import StabilityTask

    options = EvaluationOptions(coverage=args.coverage, bond_lengths=args.bonds, num_proc=args.num_proc,
                                ray=args.ray, limit=args.limit, ids=tuple(read_ids(args.ids)) if args.ids else None,
                                plots=args.plots, records_path=args.records, progress=not args.quiet,
                                neighbours=args.neighbours, inputs=_policy(args))
    csp = CSPTask(args.csp, args.csp_ids, tuple(args.attempts)) if args.csp else None
    stability = StabilityTask(_relaxation(args, fmax=args.relax_fmax, max_seconds=args.relax_seconds),
                              args.stability_cache) if args.stability else None
    reference = args.reference
    if args.reference_embeddings:
        if not args.reference:
            raise CrystaLLMInputError("--reference-embeddings: name the reference collection with --reference too")
        from crystallm.properties.embedding import knn_reference

        reference = knn_reference(args.reference, args.reference_embeddings)
    summary = evaluate(args.input, reference=reference, test=args.test, csp=csp, stability=stability,
                       options=options)
    for name in (summary.get("skipped") or {}).get("names", []):  # refused entries carry their reason
        print(f"skipped: {name}", file=sys.stderr)
    print(metrics.markdown_table(summary))
    if args.json:
        reports.write_json(summary, args.json)
    if args.markdown:
        metrics.write_markdown(summary, args.markdown)
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    """Embed a collection (one unit vector a structure, safetensors); with --nearest, list each structure's
    nearest entries of an embedded reference."""
    import numpy as np

    from crystallm.evaluation import reports
    from crystallm.evaluation.readers import iter_entries
    from crystallm.evaluation.reference import Embeddings
    from crystallm.properties.embedding import embed_entries

    reference = Embeddings.from_file(args.nearest) if args.nearest else None  # a bad file fails before the work
    model = args.model or (reference.model if reference else None) or None
    embeddings = embed_entries(list(iter_entries(args.input)), model, source=str(args.input))
    unreadable = int((~np.isfinite(embeddings.vectors).all(axis=1)).sum())  # rows of NaN: no structure read
    if unreadable == len(embeddings.names):
        raise CrystaLLMInputError(f"{args.input}: no readable structure to embed ({unreadable} entries); nothing "
                                  f"written")
    embeddings.save(args.out)
    print(f"{len(embeddings.names)} embeddings of {args.input} by {embeddings.model or 'the shipped model'} "
          f"-> {args.out}" + (f"; {unreadable} entries could not be read: their rows are NaN" if unreadable else ""))
    if reference:
        if reference.model != embeddings.model:
            raise CrystaLLMInputError(f"{args.nearest}: embedded by {reference.model or 'the shipped model'}, not "
                                      f"{embeddings.model or 'the shipped model'}; embed both with the same model")
        nearest = reference.nearest(embeddings.vectors, args.top)
        path = Path(args.out).with_suffix(".nearest.jsonl")
        reports.write_json_lines([{"name": name, "nearest": [{"name": n, "cosine": round(c, 4)} for n, c in row]}
                                  for name, row in zip(embeddings.names, nearest)], path)
        print(f"the {args.top} nearest entries of {reference.source or args.nearest} for each -> {path}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate crystals into an output folder (see `crystallm.generation.run_folder`), resumable, with a
    progress bar."""
    from crystallm.adapters import available_adapters, use_adapter
    from crystallm.compute import bf16_pays
    from crystallm.diffraction.encoder import PATTERN_ADAPTER
    from crystallm.diffraction.patterns import PowderPattern
    from crystallm.evaluation import metrics
    from crystallm.generation.prompt import Prompt
    from crystallm.generation.run_folder import GenerationFolder, generate_into, merge_shards, shard_directory
    from crystallm.generation.sampling import load_generator
    from crystallm.generation.settings import DEFAULT_MAX_ATOMS, SamplingSettings
    from crystallm.model_folder import loaded_from

    sampling = SamplingSettings(seed=args.seed, batch_size=args.batch_size, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, max_atoms=args.max_atoms or DEFAULT_MAX_ATOMS,
                                guidance=args.guidance, min_distance=args.min_distance,
                                charge_neutral=args.charge_neutral, refine=args.refine, symmetrize=args.symmetrize,
                                bf16=not args.fp32 and bf16_pays())  # every sampling option is checked here
    if (args.adapter is None) != (args.target is None):
        raise CrystaLLMInputError("--adapter and --target go together: the adapter of a property and its target "
                                  "value, e.g. --adapter band_gap --target 2.0")
    if args.guidance != 1.0 and not args.adapter:
        raise CrystaLLMInputError("--guidance needs a property target: --adapter NAME --target VALUE")
    if args.xrd and args.adapter:
        raise CrystaLLMInputError("--xrd and --adapter cannot go together: one adapter is active at a time")
    pattern = PowderPattern.from_file(args.xrd) if args.xrd else None  # a bad pattern fails before the model loads
    shard, launched = args.shard or (0, 1), None
    if args.shard is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under `accelerate launch`
        import torch
        from accelerate import PartialState

        launched = PartialState(cpu=not torch.cuda.is_available())  # CPU processes talk over gloo
        shard, args.device = (launched.process_index, launched.num_processes), args.device or str(launched.device)
    model, tokenizer = load_generator(args.model, args.device)
    # The pattern goes into the prompt where the model has the pattern adapter; without one it is used after
    # generation alone: each structure's cell is fitted to it, then the structures are ranked by agreement.
    in_prompt = pattern is not None and PATTERN_ADAPTER in available_adapters(loaded_from(model))
    if args.adapter or in_prompt:  # an unknown adapter fails here, listing the model's adapters
        model = use_adapter(model, args.adapter or PATTERN_ADAPTER)
    property_name = Path(args.adapter).name if args.adapter else None
    prompt = Prompt.of(args.formula, args.spacegroup, args.chemical_system, property_name, args.target)
    if in_prompt:
        prompt = prompt.with_pattern(pattern)
    elif pattern:
        print(f"the model in {loaded_from(model)} has no {PATTERN_ADAPTER} adapter: generating from the prompt "
              f"alone; the pattern fits each structure's cell and ranks them")
    # an impossible prompt fails before any write
    prompt.grammar(tokenizer, sampling.max_atoms, model.config.n_positions)
    run = {"model": str(args.model or "default"), "adapter": args.adapter, "prompt": prompt.describe(),
           "num": args.num}
    if shard != (0, 1):  # each shard is a folder of its own, with its own journal and resume
        folder = GenerationFolder(shard_directory(args.out, shard), sampling,
                                  run | {"shard": f"{shard[0]}/{shard[1]}"}, resume=args.resume)
        generate_into(folder, model, tokenizer, prompt, num=args.num, progress=not args.quiet, shard=shard)
        if launched is None:
            print(f"wrote shard {shard[0]} of {shard[1]} ({folder.finished} structures) to {folder.directory}/; "
                  f"when every shard is done: crystallm merge {args.out}")
            return 0
        launched.wait_for_everyone()
        if not launched.is_main_process:
            return 0
        folder = merge_shards(args.out)
        summary = folder.finish()
    else:
        folder = GenerationFolder(args.out, sampling, run, resume=args.resume)
        summary = generate_into(folder, model, tokenizer, prompt, num=args.num, progress=not args.quiet)
    print(metrics.markdown_table(summary))
    print(f"wrote {folder.finished} structures to {folder.directory}/ (cifs.zip, structures.extxyz, summary.csv, "
          f"summary.json)")
    if pattern:
        _rank_by_pattern(folder, pattern)
    if args.rank:
        _rank_by_energy(folder, _relaxation(args), progress=not args.quiet)
    return 0


def _rank_by_pattern(folder, pattern) -> None:
    """Fit each valid structure's cell to the given pattern (`lattice_fit`), write the fitted structures
    (pattern_fitted.zip), pattern_ranking.csv (best agreement with the pattern first) and the overlay plot of the
    best."""
    from crystallm.diffraction.lattice_fit import fit_lattice
    from crystallm.diffraction.patterns import plot_overlay, rank_by_agreement
    from crystallm.evaluation import reports
    from crystallm.io.cif import write_cif_zip

    given = pattern.to_profile()
    fits = {name: fit_lattice(structure, given) for name, structure in folder.valid_structures()}
    write_cif_zip(folder.directory / "pattern_fitted.zip", {name: fit.structure for name, fit in fits.items()})
    matches = rank_by_agreement([(name, fit.structure) for name, fit in fits.items()], given)
    lattice = ["a", "b", "c", "alpha", "beta", "gamma"]
    rows = [{"rank": rank, "name": m.name, "formula": m.structure.composition.reduced_formula,
             "disagreement": round(m.disagreement, 4), "crystal_system": fits[m.name].crystal_system,
             "cell_fitted": fits[m.name].fitted,
             "peak_misfit_before_fit": round(fits[m.name].misfit_before, 5),
             "peak_misfit_after_fit": round(fits[m.name].misfit_after, 5),
             **dict(zip(lattice, (round(v, 4) for v in m.structure.lattice.parameters)))}
            for rank, m in enumerate(matches, 1)]
    reports.write_csv(rows, folder.directory / "pattern_ranking.csv")
    for row in rows[:5]:
        print(f"{row['rank']}. {row['name']} {row['formula']}: disagreement {row['disagreement']:.3f} "
              f"(a b c = {row['a']:.3f} {row['b']:.3f} {row['c']:.3f} A)")
    if matches:
        plot_overlay(given, matches[0], folder.directory / "pattern_overlay.png", pattern.source)
    print(f"fitted the cells of {len(rows)} structures to {pattern.source} ({folder.directory}/pattern_fitted.zip) "
          f"and ranked them by agreement with it (Rwp-like on profiles smoothed to 1 degree, 0 = the same up to "
          f"scale, 1 = no overlap): {folder.directory}/pattern_ranking.csv; the best is plotted against it in "
          f"pattern_overlay.png")


def cmd_merge(args: argparse.Namespace) -> int:
    """Join complete shard folders into one generation folder."""
    from crystallm.evaluation import metrics
    from crystallm.generation.run_folder import merge_shards

    folder = merge_shards(args.out)
    print(metrics.markdown_table(folder.finish()))
    print(f"merged {folder.finished} structures into {folder.directory}/")
    return 0


def _rank_by_energy(folder, settings: RelaxationSettings, progress: bool) -> None:
    """Relax every structurally valid sample (at most `settings.steps` FIRE steps; 0: as generated) and write
    ranking.csv, lowest energy per atom by the settings' potential first."""
    from pymatgen.core import Structure

    from crystallm.evaluation import reports
    from crystallm.evaluation.relaxation import rank_by_energy

    ranking = rank_by_energy(folder.valid_structures(), folder.directory / "stability.jsonl", settings,
                             progress=progress)
    columns = ("rank", "name", "formula", "energy_per_atom", "e_above_hull", "rmsd", "converged", "error")
    rows = [{key: record.get(key) for key in columns} | {"formula": Structure.from_dict(
        record["relaxed"]).composition.reduced_formula if "relaxed" in record else ""} for record in ranking]
    reports.write_csv(rows, folder.directory / "ranking.csv")
    for row in rows[:5]:
        energy = "failed: " + row["error"] if row["error"] else \
            f"{row['energy_per_atom']:.4f} eV/atom ({settings.potential}), E_hull {row['e_above_hull']:.3f}"
        print(f"{row['rank']}. {row['name']} {row['formula']}: {energy}")
    how = f"relaxed (at most {settings.steps} FIRE steps)" if settings.steps else "as generated"
    print(f"ranked {len(rows)} structures by {settings.potential} energy, {how}: {folder.directory}/ranking.csv")


def cmd_design(args: argparse.Namespace) -> int:
    """Property targets -> candidates -> a screened, ranked shortlist (see `crystallm.design`)."""
    from crystallm.design import plan_design, run_design
    from crystallm.generation.sampling import load_generator
    from crystallm.generation.settings import SamplingSettings
    from crystallm.model_folder import DEFAULT_MODEL, resolve_model_folder

    folder = resolve_model_folder(args.model or DEFAULT_MODEL)
    sampling = SamplingSettings(seed=args.seed, batch_size=args.batch_size, guidance=args.guidance)
    plan = plan_design(folder, args.target, args.elements or args.chemical_system, num=args.num, top=args.top,
                       e_hull_max=args.e_hull_max, sampling=sampling,
                       relaxation=_relaxation(args))
    model, tokenizer = load_generator(folder, args.device)  # every input is checked before this
    funnel = run_design(model, tokenizer, plan, args.out, progress=not args.quiet)
    print(" -> ".join(f"{stage} {count}" for stage, count in funnel.items()))
    print(f"wrote {args.out}/shortlist.csv, funnel.json, report.md")
    return 0


def cmd_substitute(args: argparse.Namespace) -> int:
    """A known crystal -> its element substitutions ranked by the masked-atom pass, as CIFs and candidates.csv."""
    from crystallm.generation.substitution import load_substitution_model, write_substitutions

    text = _text_or_cif(args.structure)
    model, tokenizer = load_substitution_model(args.model, args.device)
    rows = write_substitutions(model, tokenizer, text, args.out, args.element, args.sites, args.top,
                               args.charge_neutral, _relaxation(args) if args.relax else None,
                               progress=not args.quiet)
    for row in rows:
        energy = f"  E_hull {row['e_above_hull']} eV/atom" if row.get("e_above_hull") is not None else ""
        print(f"{row['rank']:>3}  {row['replaced']} -> {row['element']:<3} {row['formula']:<14} "
              f"log p {row['log_probability']:.3f}{energy}")
    print(f"wrote {args.out}/candidates.csv and {len(rows)} CIFs")
    return 0


def SITES(text: str) -> list[int]:  # an argparse type, named like the others
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: site rows as numbers separated by commas, e.g. 0,2") from None


def cmd_push(args: argparse.Namespace) -> int:
    """Push a model folder (with its adapters and a generated model card) to the Hugging Face Hub."""
    from crystallm.hub import push_to_hub

    url = push_to_hub(args.model_dir, args.repo_id, private=args.private, adapters=args.adapters)
    print(f"pushed {args.model_dir} to {args.repo_id}: {url}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (`crystallm generate: error: ...`, exit code 2), no usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _number(kind: type, low: float, low_open: bool = False, high: float | None = None, what: str = ""):
    """An argparse type: a number of `kind` in [low, high] (low excluded when `low_open`), else a one-line error
    that says the range."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        below = value <= low if low_open else value < low
        if not math.isfinite(value) or below or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text}: expected {what}")
        return value
    return parse


POSITIVE = _number(int, 1, what="a whole number of at least 1")
COUNT = _number(int, 0, what="a whole number of 0 or more")
POSITIVE_FLOAT = _number(float, 0, low_open=True, what="a number above 0")
SYMPREC = _number(float, 0, low_open=True, what="a tolerance above 0 (Å)")


def SHARD(text: str) -> tuple[int, int]:  # an argparse type, named like the others
    """An argparse type: I/N with 0 <= I < N, e.g. 0/4."""
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise argparse.ArgumentTypeError(f"{text!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    return int(index), int(count)


def _add_input_policy(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--follow-links", action="store_true", help="read links that lead out of an input folder")
    parser.add_argument("--max-file-mb", type=POSITIVE_FLOAT, default=MAX_FILE_BYTES / 2**20,
                        help=f"larger files in an input folder are refused (default {MAX_FILE_BYTES // 2**20})")


def _add_relaxation(parser: argparse.ArgumentParser, steps_type=None, steps_help: str = "FIRE steps at most per "
                    "structure", potential: bool = True) -> None:
    """--relax-steps, --potential and --hull: how structures are relaxed and where they are placed."""
    parser.add_argument("--relax-steps", type=steps_type or POSITIVE, default=100, help=steps_help)
    if potential:
        parser.add_argument("--potential", choices=list(POTENTIALS), default="chgnet", help="the potential that "
                            "relaxes (sevennet: SevenNet-l3i5, needs pip install crystallm[sevennet]; default chgnet)")
    parser.add_argument("--hull", metavar="FILE", help="hull file to place relaxed structures on (default: the "
                        "approximate hull the package ships; eval/mp_hull.py writes MP's own, for measurement)")


def _relaxation(args: argparse.Namespace, **settings) -> RelaxationSettings:
    """The relaxation settings of a command's --relax-steps, --potential (or --rank) and --hull."""
    potential = getattr(args, "potential", None) or args.rank
    return RelaxationSettings(steps=args.relax_steps, potential=potential, hull=args.hull, **settings)


def _add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=POSITIVE, help="torch threads (default: the cores free to this process, "
                        "so a busy neighbour is not fought over)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="crystallm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serialize = commands.add_parser("serialize", help="CIF files or folders -> crystallm text")
    serialize.add_argument("inputs", nargs="+", type=Path)
    serialize.add_argument("--out", help="write the texts to this file instead of standard output")
    serialize.add_argument("--symprec", type=SYMPREC, default=symmetry.DEFAULT_SYMPREC)
    _add_input_policy(serialize)
    serialize.set_defaults(run=cmd_serialize)

    tokenize = commands.add_parser("tokenize", help="show the tokens of crystallm texts or CIFs")
    tokenize.add_argument("inputs", nargs="+", type=Path)
    tokenize.set_defaults(run=cmd_tokenize)

    to_cif = commands.add_parser("to-cif", help="crystallm text -> standard CIF")
    to_cif.add_argument("input", type=Path)
    to_cif.add_argument("--out")
    to_cif.set_defaults(run=cmd_to_cif)

    sym = commands.add_parser("symmetry", help="space group of CIFs at several tolerances (spglib)")
    sym.add_argument("inputs", nargs="+", type=Path)
    sym.add_argument("--symprec", type=SYMPREC, nargs="+", default=[0.1, 0.01, 0.001])
    _add_input_policy(sym)
    sym.set_defaults(run=cmd_symmetry)

    evaluate = commands.add_parser("evaluate", help="validity, symmetry, uniqueness, novelty, coverage, CSP")
    _add_input_policy(evaluate)
    evaluate.add_argument("input", help="cifs.zip, a folder of CIFs, an extxyz, a CSV with a cif or text column, "
                                        "a `crystallm generate` output folder, or a split such as mp20-bt/test")
    evaluate.add_argument("--reference", help="training set for novelty (split such as mp20-bt/train, or a file)")
    evaluate.add_argument("--reference-embeddings", metavar="FILE", help="the reference's `crystallm embed` "
                          "file: match each structure against its --neighbours nearest same-formula entries only")
    evaluate.add_argument("--neighbours", type=POSITIVE, default=10, help="with --reference-embeddings (default 10)")
    evaluate.add_argument("--test", help="test set for Wasserstein distances and coverage (e.g. mp20-bt/test)")
    evaluate.add_argument("--csp", help="CSP targets (e.g. mp20-bt/test); input entries are named <id>[__<k>]")
    evaluate.add_argument("--csp-ids", help="file of target ids, one a line (../shared/benchmarks/*.txt)")
    evaluate.add_argument("--attempts", type=POSITIVE, nargs="+", default=[1, 20], help="n for CSP match rates")
    evaluate.add_argument("--coverage", action="store_true", help="COV-R/COV-P (CrystalNN fingerprints: slower)")
    evaluate.add_argument("--bonds", action="store_true", help="bond-length reasonableness (CrystalNN: slower)")
    evaluate.add_argument("--stability", action="store_true", help="relax the structurally valid structures "
                          "(--potential): E_hull against a hull (--hull), RMSD, S.U.N. rate (with --reference); "
                          "resumable")
    evaluate.add_argument("--stability-cache", help="JSON-lines file of relaxation results, kept between runs "
                          "(default: stability.jsonl in the input folder, or beside the input file)")
    _add_relaxation(evaluate)
    evaluate.add_argument("--relax-fmax", type=POSITIVE_FLOAT, default=0.1, help="converged below this force, eV/Å")
    evaluate.add_argument("--relax-seconds", type=POSITIVE_FLOAT, default=60.0, help="time limit per structure")
    evaluate.add_argument("--json")
    evaluate.add_argument("--markdown")
    evaluate.add_argument("--plots", help="folder for PNG plots")
    evaluate.add_argument("--records", help="JSON-lines file of per-structure results, written as they come")
    evaluate.add_argument("--num-proc", type=POSITIVE, default=None, help="worker processes (default: all cores)")
    evaluate.add_argument("--ray", metavar="local|auto|ADDRESS", help="run the scoring and relaxation workers on a "
                          "Ray cluster (pip install 'crystallm[ray]'): local starts one here, auto joins the running "
                          "one, or its address; --num-proc then counts Ray workers (default: every CPU there)")
    evaluate.add_argument("--limit", type=POSITIVE, help="evaluate only the first N entries")
    evaluate.add_argument("--ids", help="evaluate only the entries named in this file, one a line "
                          "(e.g. ../shared/benchmarks/mp20bt-test-csp1000.txt)")
    evaluate.add_argument("--quiet", action="store_true")
    evaluate.set_defaults(run=cmd_evaluate)

    embed = commands.add_parser("embed", help="embedding vectors of structures; their nearest known materials")
    embed.add_argument("input", help="any collection `evaluate` reads (CIFs, a generate folder, a CSV, a split)")
    embed.add_argument("--out", required=True, help="the .safetensors file to write (names in its metadata)")
    embed.add_argument("--model", help="model folder or Hub id (default: the shipped model, or --nearest's model)")
    embed.add_argument("--nearest", metavar="FILE", help="an embedded reference: write each structure's nearest "
                       "entries of it to OUT.nearest.jsonl")
    embed.add_argument("--top", type=POSITIVE, default=5, help="how many nearest entries (default 5)")
    embed.set_defaults(run=cmd_embed)

    generate = commands.add_parser("generate", help="generate crystal structures (default: the shipped model)")
    generate.add_argument("--model", help="a model folder (save_pretrained) or Hub id; default: the shipped model")
    generate.add_argument("--num", type=POSITIVE, default=100, help="how many structures (default 100)")
    generate.add_argument("--formula", help="crystal structure prediction for this formula, e.g. LiFePO4")
    generate.add_argument("--spacegroup", help="impose a space group: number or symbol, e.g. 225 or Fm-3m")
    generate.add_argument("--chemical-system", help="only formulas of exactly these elements, e.g. Li-Fe-O")
    generate.add_argument("--adapter", help="condition on a property with its adapter: a name saved beside the "
                          "model (band_gap, formation_energy_per_atom) or an adapter folder; needs --target")
    generate.add_argument("--target", type=float, help="the property value to aim for, in the property's unit "
                          "(eV for band_gap, eV/atom for formation_energy_per_atom)")
    generate.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale with "
                          "--adapter (default 1: none; 2 pushes harder towards the target, twice the compute)")
    generate.add_argument("--xrd", metavar="PATTERN", help="condition on a powder pattern (Cu Ka, 2-theta in "
                          "degrees): a two-column .xy/.xye/.csv export, or a CIF whose pattern is computed; in the "
                          "prompt where the model has an xrd adapter; each sample's cell is fitted to it and the "
                          "samples are ranked by agreement with it")
    generate.add_argument("--attempts", type=POSITIVE, dest="num", default=argparse.SUPPRESS,
                          help="the same as --num (CSP: attempts at a formula)")
    generate.add_argument("--rank", choices=list(POTENTIALS), metavar="POTENTIAL", help="relax every valid sample "
                          f"with this potential ({', '.join(POTENTIALS)}) and write ranking.csv, lowest energy first "
                          "(the best CSP guess first)")
    _add_relaxation(generate, COUNT, "with --rank: FIRE steps at most per sample; 0 ranks by the energy as generated "
                    "(on 100 CSP targets as good a ranking as relaxed, in 1/80 of the time)", potential=False)
    generate.add_argument("--out", default="generated", help="output folder (default ./generated)")
    generate.add_argument("--batch-size", type=POSITIVE, default=64)
    generate.add_argument("--seed", type=COUNT, default=0)
    generate.add_argument("--temperature", type=float, default=1.0,
                          help="sampling temperature (default 1; 0 is greedy decoding)")
    generate.add_argument("--top-k", type=POSITIVE, default=None)
    generate.add_argument("--top-p", type=float, default=None)
    generate.add_argument("--max-atoms", type=POSITIVE, help="atoms in the conventional cell, at most (default 160)")
    generate.add_argument("--refine", action=argparse.BooleanOptionalAction, default=None,
                          help="move atoms and cell toward equilibrium with the model's geometry refinement head "
                               "(default: as the head's config says, when the model has one)")
    generate.add_argument("--symmetrize", action="store_true", help="snap each structure to the symmetry spglib "
                                                                     "finds (symprec 0.1)")
    generate.add_argument("--resume", action="store_true", help="continue the run in --out")
    generate.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    generate.add_argument("--min-distance", type=float, default=0.5, help="no two atoms closer than "
                          "this, in Å, enforced while decoding (default 0.5: structural validity; 0: off)")
    generate.add_argument("--charge-neutral", action="store_true", help="only formulas that pass SMACT's "
                          "charge-neutrality test (unconditional and --chemical-system prompts)")
    generate.add_argument("--fp32", action="store_true", help="no bf16 autocast (default: bf16 where the CPU "
                          "computes it natively, AVX512-BF16 or AMX)")
    generate.add_argument("--shard", type=SHARD, help="I/N: generate only shard I of N (its batches I, I+N, ...) "
                          "into --out/shard-I-of-N, resumable on its own; `crystallm merge` joins the N shards into "
                          "the run one process would make. Under `accelerate launch` each process takes its shard "
                          "and the main process merges")
    generate.add_argument("--quiet", action="store_true", help="no progress bar")
    generate.set_defaults(run=cmd_generate)

    merge = commands.add_parser("merge", help="join the shard folders of a generate run (--shard I/N) into one")
    merge.add_argument("out", help="the --out folder of the shards")
    merge.set_defaults(run=cmd_merge)

    design = commands.add_parser("design", help="property targets -> screened, ranked shortlist of new crystals")
    design.add_argument("--target", action="append", default=[], help="PROPERTY=VALUE[:TOLERANCE], e.g. "
                        "band_gap=2.0 (repeat for several properties; default tolerances 0.5 eV, 0.25 eV/atom)")
    design.add_argument("--elements", help="only compounds of exactly these elements, e.g. Li,Fe,P,O")
    design.add_argument("--chemical-system", help="the same as a system, e.g. Li-Fe-P-O")
    design.add_argument("--num", type=POSITIVE, default=2000, help="candidates to generate (split between targets)")
    design.add_argument("--top", type=POSITIVE, default=50, help="length of the shortlist")
    design.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale")
    design.add_argument("--e-hull-max", type=POSITIVE_FLOAT, default=0.1, help="E_hull threshold, eV/atom")
    _add_relaxation(design)
    design.add_argument("--model", help="model folder or Hub id (default: the shipped model)")
    design.add_argument("--out", default="design", help="output folder (default ./design); rerun to resume")
    design.add_argument("--seed", type=COUNT, default=0)
    design.add_argument("--batch-size", type=POSITIVE, default=64)
    design.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    design.add_argument("--quiet", action="store_true", help="no progress bars")
    design.set_defaults(run=cmd_design)

    substitute = commands.add_parser("substitute", help="rank element substitutions of a known crystal "
                                     "(masked-atom pass), optionally relaxed (CHGNet or SevenNet)")
    substitute.add_argument("structure", type=Path, help="a CIF or a crystallm text file")
    which = substitute.add_mutually_exclusive_group(required=True)
    which.add_argument("--element", help="replace this element on every orbit it occupies")
    which.add_argument("--sites", type=SITES, help="replace the element of these rows of the asymmetric unit "
                       "(0-based, as `crystallm serialize` lists them; one element)")
    substitute.add_argument("--top", type=POSITIVE, default=10, help="how many candidates (default 10)")
    substitute.add_argument("--charge-neutral", action="store_true", help="keep SMACT charge-neutral formulas only")
    substitute.add_argument("--relax", action="store_true", help="relax each candidate (--potential); E_hull "
                            "against a hull (--hull; resumable through OUT/stability.jsonl)")
    _add_relaxation(substitute)
    substitute.add_argument("--out", required=True, help="output folder")
    substitute.add_argument("--model", help="model folder or Hub id (default: the shipped model)")
    substitute.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    substitute.add_argument("--quiet", action="store_true")
    substitute.set_defaults(run=cmd_substitute)

    push = commands.add_parser("push", help="push a model folder, its adapters and a model card to the Hub")
    push.add_argument("model_dir", help="a model folder (save_pretrained layout, adapters in adapters/<name>/)")
    push.add_argument("repo_id", help="the Hub repository, user/name (created if needed)")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--adapters", nargs="*", help="the adapters to push (default: all in the folder)")
    push.set_defaults(run=cmd_push)
    for command in (evaluate, embed, generate, design, substitute):  # last in their help: rarely set
        _add_threads(command)
    return parser


def _kept(args: argparse.Namespace) -> str:
    """What an interrupted command kept, for its one line: the samples of a run folder and how to go on."""
    if args.command == "design":
        return f"; what was finished is kept in {args.out}: run the same command again to resume"
    journal = Path(getattr(args, "out", None) or ".") / "samples.jsonl"
    if args.command != "generate" or not journal.exists():
        return ""
    with open(journal, "rb") as handle:
        kept = sum(1 for line in handle if line.endswith(b"\n"))
    return f"; the {kept} structures finished are kept in {args.out}: add --resume to the same command to continue"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `crystallm` console command."""
    args = build_parser().parse_args(argv)
    from transformers.utils import logging

    logging.disable_progress_bar()  # "Loading weights" bars: noise on a command line
    logging.set_verbosity_error()  # e.g. a padding notice about rows that finished early, which generate ignores

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        kind = "" if category is CrystaLLMWarning else category.__name__ + ": "
        print(f"crystallm {args.command}: warning: {kind}{message}", file=sys.stderr)

    # The command's warning format and filters last as long as the command: a later call (another command, or a
    # library user in the same process) gets its own.
    with warnings.catch_warnings():
        warnings.showwarning = show
        warnings.filterwarnings("ignore", category=FutureWarning)  # libraries' deprecation notices, not the user's
        warnings.filterwarnings("ignore", message="No Pauling electronegativity")  # pymatgen, for noble gases
        import torch

        threads = torch.get_num_threads()  # the command's choice lasts as long as the command (a library user
        try:                                 # calling main() keeps its own)
            if hasattr(args, "threads"):
                from crystallm.compute import use_threads

                use_threads(args.threads)
            return args.run(args)
        except (CrystaLLMInputError, OSError) as error:  # bad input or a full/unwritable disk: one line
            print(f"crystallm {args.command}: error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # Ctrl-C: what is finished is on disk; say so in one line, not a traceback
            print(f"crystallm {args.command}: interrupted{_kept(args)}", file=sys.stderr)
            return 130
        finally:
            torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
