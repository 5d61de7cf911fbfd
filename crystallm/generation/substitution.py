"""Element substitution by the masked-atom objective: hide an element of a known crystal wherever its text
writes it (the formula and the site rows of its orbits), and rank the elements that could take its place by the
model's bidirectional pass. Each candidate keeps the cell, the Wyckoff positions and the coordinates; only the
element changes, on every site of the chosen orbits. `write_substitutions` (`crystallm substitute`) writes the
ranked candidates as CIFs and a table, each optionally relaxed by CHGNet and placed on the approximate hull (the
stability protocol's code).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from pymatgen.core import Composition, Structure

from crystallm.adapters import available_adapters, use_adapter
from crystallm.errors import CrystaLLMInputError
from crystallm.evaluation import reports
from crystallm.evaluation.relaxation import RelaxationSettings, stability_records
from crystallm.generation.sampling import load_generator
from crystallm.io import cif, text_format
from crystallm.model_folder import loaded_from
from crystallm.tokenization import element_positions, formula_element_token_ids, row_element_token_ids
from crystallm.validity import compositional_validity

# The adapter that ranks substitutions (`training.adapter.train_masked_atom_adapter`): a base trained by the causal
# LM alone has never seen `<mask>`.
MASKED_ATOM_ADAPTER = "masked_atom"


def load_substitution_model(model: str | Path | None = None, device: str | None = None, adapter: bool = True):
    """The model and tokenizer that rank substitutions: `model` (a folder, a Hub id or None for the shipped
    default) with its masked-atom adapter active where it has one and `adapter` is true
    (docs/substitution-and-embedding.md).

    >>> model, tokenizer = load_substitution_model()
    >>> from crystallm.adapters import active_adapter
    >>> active_adapter(model)
    'masked_atom'
    """
    model, tokenizer = load_generator(model, device)
    if adapter and MASKED_ATOM_ADAPTER in available_adapters(loaded_from(model)):
        model = use_adapter(model, MASKED_ATOM_ADAPTER)
    return model, tokenizer


@dataclasses.dataclass(frozen=True)
class Substitution:
    """One candidate: `element` in place of `replaced` on the chosen orbits, with the model's log-probability
    (summed over every masked position) and the substituted structure."""

    replaced: str
    element: str
    log_probability: float
    structure: Structure

    @property
    def formula(self) -> str:
        return self.structure.composition.reduced_formula


def _chosen_rows(crystal: text_format.CrystalText, element: str | None, sites: list[int] | None) -> list[int]:
    rows = list(range(len(crystal.sites)))
    if (element is None) == (sites is None):
        raise CrystaLLMInputError("name either an element to replace or the site rows (orbits) to substitute")
    if element is not None:
        chosen = [row for row in rows if crystal.sites[row].element == element]
        if not chosen:
            present = ", ".join(crystal.formula)
            raise CrystaLLMInputError(f"element {element}: not in the structure (it has {present})")
        return chosen
    bad = [site for site in sites if site not in rows]
    if bad:
        raise CrystaLLMInputError(f"site rows {bad}: the structure's asymmetric unit has rows 0-{len(rows) - 1}")
    replaced = {crystal.sites[row].element for row in sites}
    if len(replaced) > 1:
        raise CrystaLLMInputError(f"site rows {sites} hold {', '.join(sorted(replaced))}: substitute one element "
                                  f"at a time")
    return sorted(set(sites))


@torch.no_grad()
def substitution_log_probabilities(model, tokenizer, text: str, element: str | None = None,
                                   sites: list[int] | None = None) -> dict[str, float]:
    """For each element, the log-probability the bidirectional pass gives it at every masked position of `text`
    with `element` (or the element of site rows `sites`) hidden, and its formula token too when the hidden rows
    hold all of that element.

    >>> from crystallm.generation.sampling import load_generator
    >>> model, tokenizer = load_generator()
    >>> text = ("data_NaCl\\n_space_group_name_H-M_alt Fm-3m\\n_cell_formula_units_Z 4\\n_cell_length_a 5.64\\n"
    ...         + text_format.LOOP_HEADER + "\\nNa 4a . . .\\nCl 4b . . .")
    >>> scores = substitution_log_probabilities(model, tokenizer, text, element="Cl")
    >>> len(scores), all(score < 0 for score in scores.values())
    (118, True)
    """
    crystal = text_format.read_crystal_text(text)
    rows = _chosen_rows(crystal, element, sites)
    replaced = crystal.sites[rows[0]].element
    ids = tokenizer(text, return_tensors="pt")["input_ids"].to(model.device)
    if ids.shape[1] > model.config.n_positions:
        raise CrystaLLMInputError(f"the structure's text is {ids.shape[1]} tokens, more than the model reads "
                                  f"({model.config.n_positions}); substitution needs a smaller cell")
    row_starts = torch.isin(ids, torch.tensor(row_element_token_ids(tokenizer), device=ids.device))
    row_positions = row_starts[0].nonzero().flatten()[rows]
    masked = torch.zeros_like(ids, dtype=torch.bool)
    masked[0, row_positions] = True
    whole = all(site.element != replaced for i, site in enumerate(crystal.sites) if i not in rows)
    if whole:  # the formula would give it away
        masked |= element_positions(tokenizer, ids, replaced) & ~row_starts
    hidden = model.encode(ids.masked_fill(masked, tokenizer.mask_token_id), bidirectional=True)
    log_probs = torch.log_softmax(model.lm_head(hidden[masked]).float(), dim=-1)
    is_row = row_starts[masked]
    formula_ids = torch.tensor(formula_element_token_ids(tokenizer), device=ids.device)
    row_ids = torch.tensor(row_element_token_ids(tokenizer), device=ids.device)
    scores = torch.where(is_row[:, None], log_probs[:, row_ids], log_probs[:, formula_ids]).sum(0)
    return dict(zip(text_format.element_symbols(), scores.tolist()))


def rank_substitutions(model, tokenizer, structure: Structure | str, element: str | None = None,
                       sites: list[int] | None = None, top: int = 10,
                       charge_neutral: bool = False) -> list[Substitution]:
    """The `top` elements most likely in place of `element` (every orbit of it), or of the element of the
    asymmetric-unit `sites` (rows of the crystal's text, one element), best first. Elements the structure already
    holds are left out; with `charge_neutral`, so are formulas that fail SMACT's neutrality test.

    >>> from pymatgen.core import Lattice
    >>> from crystallm.generation.sampling import load_generator
    >>> model, tokenizer = load_generator()
    >>> nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [.5, .5, .5]])
    >>> candidates = rank_substitutions(model, tokenizer, nacl, element="Na", top=3)
    >>> len(candidates), candidates[0].structure.composition.reduced_formula != "NaCl"
    (3, True)
    """
    text = structure if isinstance(structure, str) else text_format.serialize_structure(structure)
    crystal = text_format.read_crystal_text(text)
    rows = _chosen_rows(crystal, element, sites)
    replaced = crystal.sites[rows[0]].element
    scores = substitution_log_probabilities(model, tokenizer, text, element, sites)
    present = set(crystal.formula)
    candidates = []
    for symbol, score in sorted(scores.items(), key=lambda item: -item[1]):
        if symbol in present:
            continue
        substituted = dataclasses.replace(crystal, sites=tuple(
            dataclasses.replace(site, element=symbol) if row in rows else site
            for row, site in enumerate(crystal.sites)))
        new = text_format.crystal_text_to_structure(substituted)
        if charge_neutral and not _neutral(new.composition):
            continue
        candidates.append(Substitution(replaced, symbol, score, new))
        if len(candidates) == top:
            break
    return candidates


def _neutral(composition: Composition) -> bool:
    return compositional_validity(composition)


def write_substitutions(model, tokenizer, structure: Structure | str, out: str | Path, element: str | None = None,
                        sites: list[int] | None = None, top: int = 10, charge_neutral: bool = False,
                        relaxation: RelaxationSettings | None = None, progress: bool = True) -> list[dict]:
    """Rank substitutions (`rank_substitutions`) and write them to the folder `out`: `NN-<formula>.cif` (the
    relaxed structure when relaxed), `candidates.csv` (rank, element, log-probability, formula, and with
    `relaxation` the CHGNet energy and E_hull; `stability.jsonl` keeps the relaxations, so a rerun resumes).
    Returns the table's rows.

    >>> import tempfile
    >>> from pymatgen.core import Lattice
    >>> from crystallm.generation.sampling import load_generator
    >>> model, tokenizer = load_generator()
    >>> nacl = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [.5, .5, .5]])
    >>> rows = write_substitutions(model, tokenizer, nacl, tempfile.mkdtemp(), element="Cl", top=2)
    >>> [row["rank"] for row in rows], rows[0]["replaced"]
    ([1, 2], 'Cl')
    """
    candidates: list[Substitution] = rank_substitutions(model, tokenizer, structure, element, sites, top,
                                                        charge_neutral)
    out = Path(out)  # made once the input has passed every check: a refused input leaves no folder
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"rank": rank, "replaced": c.replaced, "element": c.element, "formula": c.formula,
             "log_probability": round(c.log_probability, 4), "cif": f"{rank:02d}-{c.formula}.cif"}
            for rank, c in enumerate(candidates, 1)]
    structures = {row["cif"]: c.structure for row, c in zip(rows, candidates)}
    if relaxation is not None:
        results = stability_records([(row["cif"], c.structure) for row, c in zip(rows, candidates)],
                                    out / "stability.jsonl", relaxation, num_proc=1, progress=progress)
        for row, result in zip(rows, results):
            row |= {"relax_error": result["error"],
                    "energy_per_atom": None if result["error"] else round(result["energy_per_atom"], 4),
                    "e_above_hull": None if result["error"] else round(result["e_above_hull"], 4)}
            if not result["error"]:
                structures[row["cif"]] = Structure.from_dict(result["relaxed"])
    for name, candidate in structures.items():
        (out / name).write_text(cif.structure_to_cif(candidate))
    reports.write_csv(rows, out / "candidates.csv")
    return rows
