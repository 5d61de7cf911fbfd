"""Running the refinement head (`crystallm.refinement.network.CrystalRefiner`): a denoiser of crystal geometry
that moves what the language model wrote toward equilibrium (docs/architecture.md).

A crystal is its CrystalText: free lattice parameters and free Wyckoff parameters. Its atoms are an affine function
of the Wyckoff parameters (each orbit member is `R_n (A p + t) + t_n`), so every move of the head is made in those
parameters and symmetry holds by construction:

- the head predicts a Cartesian displacement per atom and a strain of the cell;
- each site's parameters take the least-squares step that best follows its atoms' displacements;
- the strained cell is read back as lattice parameters, averaged where the crystal system ties them;
- along axes where the origin may slide (polar groups), the common drift is removed.

Training (`crystallm.refinement.training`) noises real corpus structures in the same parameters (`perturbed`); the
head learns the way back. Inference starts from the written structure at a small noise level and takes a few
deterministic steps down a geometric schedule (SDEdit-style, no noise added).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from pymatgen.core import Element, Lattice
from pymatgen.optimization.neighbors import find_points_in_spheres

from crystallm import symmetry, validity
from crystallm.errors import CrystaLLMInputError
from crystallm.io import text_format
from crystallm.refinement.network import GeometryBatch

_PERIODIC = np.array([1, 1, 1], dtype=np.int64)


@dataclass
class CrystalGeometry:
    """A CrystalText's atoms as arrays: the lattice matrix (rows a, b, c; Å), fractional coordinates, atomic
    numbers, the site (row of the text) of each atom and, per site, d(fractional)/d(free parameters) of its atoms.

    >>> crystal = text_format.read_crystal_text("data_Po\\n_space_group_name_H-M_alt Pm-3m\\n"
    ...     "_cell_formula_units_Z 1\\n_cell_length_a 3.35\\n" + text_format.LOOP_HEADER + "\\nPo 1a . . .")
    >>> geometry = CrystalGeometry.from_crystal(crystal)
    >>> geometry.frac.shape, geometry.elements.tolist(), geometry.jacobians[0].shape
    ((1, 3), [84], (1, 3, 0))
    """

    crystal: text_format.CrystalText
    lattice: np.ndarray
    frac: np.ndarray
    elements: np.ndarray
    site_of_atom: np.ndarray
    jacobians: list[np.ndarray]

    @classmethod
    def from_crystal(cls, crystal: text_format.CrystalText) -> CrystalGeometry:
        lattice = Lattice.from_parameters(*crystal.lattice_parameters).matrix
        frac, elements, sites, jacobians = [], [], [], []
        for index, site in enumerate(crystal.sites):
            wp = site.wyckoff
            orbit = wp.orbit(site.params)
            frac.append(orbit)
            elements += [Element(site.element).Z] * len(orbit)
            sites += [index] * len(orbit)
            jacobians.append(np.einsum("nij,jk->nik", wp.orbit_rotations, wp.rotation[:, list(wp.free_axes)]))
        return cls(crystal, lattice, np.concatenate(frac), np.array(elements), np.array(sites), jacobians)

    def moved(self, displacement: np.ndarray, strain: np.ndarray) -> text_format.CrystalText:
        """The crystal after its atoms move by `displacement` (atoms, 3; Cartesian Å) and its cell by `strain`
        (3, 3), projected onto the free Wyckoff and lattice parameters."""
        step = displacement @ np.linalg.inv(self.lattice)  # fractional
        axes = list(symmetry.free_origin_axes(self.crystal.space_group))
        step[:, axes] -= step[:, axes].mean(axis=0)  # a slide of the whole crystal is no move
        sites = []
        for index, site in enumerate(self.crystal.sites):
            params = site.params
            if params:
                mine = self.site_of_atom == index
                jacobian = self.jacobians[index]
                # Least squares in Cartesian: the parameter step whose atoms best follow the predicted ones.
                design = np.einsum("ji,njk->nik", self.lattice, jacobian).reshape(-1, len(params))
                target = (step[mine] @ self.lattice).reshape(-1)
                params = tuple(float(p) % 1.0 for p in np.asarray(params) + np.linalg.lstsq(design, target)[0])
            sites.append(text_format.AtomSite(site.element, site.wyckoff, params))
        strained = Lattice(self.lattice @ (np.eye(3) + (strain + strain.T) / 2))
        return text_format.CrystalText(self.crystal.formula, self.crystal.space_group, self.crystal.formula_units,
                                       tied_lattice_parameters(self.crystal.space_group, strained.parameters),
                                       tuple(sites))

    def shortest_distance(self) -> float:
        """The shortest periodic distance between two atoms (Å); infinite past 6 Å."""
        _, _, vectors = neighbour_pairs(self, cutoff=6.0, max_neighbours=1)
        return float(np.linalg.norm(vectors, axis=1).min()) if len(vectors) else float("inf")

    def perturbed(self, sigma: float, lattice_noise: float, rng: np.random.Generator) -> text_format.CrystalText:
        """The crystal with Gaussian noise on its free parameters: each site's representative atom moves by about
        `sigma` Å along each of its free directions, and the cell takes a random symmetric strain of size
        `sigma * lattice_noise`, both then projected as in `moved`."""
        displacement = np.zeros_like(self.frac)
        first_atoms = np.searchsorted(self.site_of_atom, np.arange(len(self.crystal.sites)))
        displacement[first_atoms] = rng.normal(0.0, sigma, (len(first_atoms), 3))
        multiplicities = np.bincount(self.site_of_atom)
        # Only the representative moves, and `moved`'s least squares averages over the orbit's atoms (isometric
        # images of it): scaling by the orbit's size undoes that, so every atom moves by about sigma.
        displacement *= multiplicities[self.site_of_atom][:, None]
        noise = rng.normal(0.0, sigma * lattice_noise, (3, 3))
        return self.moved(displacement, (noise + noise.T) / 2)

    def displacement_to(self, clean: CrystalGeometry) -> tuple[np.ndarray, np.ndarray]:
        """The true way back from this (noisy) crystal to `clean`, the same crystal before noise: each atom's
        Cartesian displacement in this cell (fractional differences the short way, drift along free origin axes
        removed) and the strain from this cell to the clean one."""
        step = clean.frac - self.frac
        step -= np.rint(step)
        axes = list(symmetry.free_origin_axes(self.crystal.space_group))
        step[:, axes] -= step[:, axes].mean(axis=0)
        # The symmetric strain that gives the clean cell's metric (lengths and angles), whatever the orientation
        # of either matrix: I + strain is the square root of (L^-1 L_clean)(L^-1 L_clean)^T.
        deformation = np.linalg.solve(self.lattice, clean.lattice)
        values, vectors = np.linalg.eigh(deformation @ deformation.T)
        return step @ self.lattice, vectors @ np.diag(np.sqrt(values)) @ vectors.T - np.eye(3)


def tied_lattice_parameters(space_group: int, parameters) -> tuple[float, ...]:
    """a, b, c, alpha, beta, gamma projected onto the space group's crystal system: tied lengths averaged, fixed
    angles restored.

    >>> tied_lattice_parameters(225, (4.0, 4.1, 4.2, 90.5, 89.9, 90.0))
    (4.1, 4.1, 4.1, 90.0, 90.0, 90.0)
    """
    a, b, c = parameters[:3]
    system = symmetry.crystal_system(space_group)
    given = dict(enumerate(float(p) for p in parameters))
    if system == "cubic":
        given[0] = float(np.mean([a, b, c]))
    elif system in ("tetragonal", "trigonal", "hexagonal"):
        given[0] = float(np.mean([a, b]))
    return tuple(round(value, 10) for value in text_format.complete_lattice_parameters(system, given))


def site_row_positions(tokens: list[str]) -> list[int]:
    """Token positions of each atom-site row's Wyckoff symbol (what the GPT knew of the site: its element and
    position, not its coordinates), in row order.

    >>> site_row_positions(["<bos>", "data_", "Na", "Cl", "\\nNa", " 4a", " .", "\\nCl", " 4b"])
    [5, 8]
    """
    elements = set(text_format.element_symbols())
    return [position + 1 for position, token in enumerate(tokens[:-1])
            if token.startswith("\n") and token[1:] in elements]


@torch.no_grad()
def site_hidden_states(model, tokenizer, crystals: list[text_format.CrystalText]) -> list[torch.Tensor]:
    """The GPT's final hidden state at each site row of each crystal's text: (sites, n_embd) per crystal."""
    texts = [text_format.format_crystal_text(crystal) for crystal in crystals]
    encoded = tokenizer(texts, padding=True, return_tensors="pt", padding_side="right").to(model.device)
    # In the precision the caller set (no autocast of its own): on a CPU without native bf16 (AVX2 only), a bf16
    # forward pass over a whole batch of texts is ~50x slower than fp32.
    hidden = model.encode(encoded["input_ids"], encoded["attention_mask"]).float()
    states = []
    for row, ids in enumerate(encoded["input_ids"].tolist()):
        positions = site_row_positions(tokenizer.convert_ids_to_tokens(ids))
        states.append(hidden[row, positions])
    return states


def neighbour_pairs(geometry: CrystalGeometry, cutoff: float, max_neighbours: int) -> tuple[np.ndarray, ...]:
    """Each atom's nearest periodic neighbours within `cutoff` Å, at most `max_neighbours` of them: centers,
    neighbours and Cartesian vectors from center to neighbour image."""
    cartesian = np.ascontiguousarray(geometry.frac @ geometry.lattice)
    centers, neighbours, images, distances = find_points_in_spheres(
        cartesian, cartesian, r=cutoff, pbc=_PERIODIC, lattice=np.ascontiguousarray(geometry.lattice))
    keep = distances > 1e-8
    centers, neighbours, images, distances = centers[keep], neighbours[keep], images[keep], distances[keep]
    order = np.lexsort((distances, centers))
    centers, neighbours, images = centers[order], neighbours[order], images[order]
    rank = np.arange(len(centers)) - np.searchsorted(centers, centers)
    nearest = rank < max_neighbours
    centers, neighbours, images = centers[nearest], neighbours[nearest], images[nearest]
    vectors = cartesian[neighbours] + images @ geometry.lattice - cartesian[centers]
    return centers, neighbours, vectors


def geometry_batch(geometries: list[CrystalGeometry], hidden: list[torch.Tensor], cutoff: float,
                   max_neighbours: int) -> GeometryBatch:
    """The head's input for a batch of crystals (`hidden`: `site_hidden_states` of the same crystals)."""
    elements, atom_hidden, crystal, centers, neighbours, vectors = [], [], [], [], [], []
    offset = 0
    for index, (geometry, states) in enumerate(zip(geometries, hidden)):
        pair_centers, pair_neighbours, pair_vectors = neighbour_pairs(geometry, cutoff, max_neighbours)
        elements.append(geometry.elements)
        atom_hidden.append(states[torch.from_numpy(geometry.site_of_atom)])
        crystal.append(np.full(len(geometry.elements), index))
        centers.append(pair_centers + offset)
        neighbours.append(pair_neighbours + offset)
        vectors.append(pair_vectors)
        offset += len(geometry.elements)
    device = hidden[0].device

    def tensor(parts, dtype):
        return torch.as_tensor(np.concatenate(parts), dtype=dtype, device=device)

    return GeometryBatch(tensor(elements, torch.long), torch.cat(atom_hidden), tensor(crystal, torch.long),
                         tensor(centers, torch.long), tensor(neighbours, torch.long), tensor(vectors, torch.float32),
                         crystals=len(geometries))


def _split_by_crystal(batch: GeometryBatch, displacement: torch.Tensor) -> list[np.ndarray]:
    counts = torch.bincount(batch.crystal, minlength=batch.crystals).tolist()
    return [part.double().cpu().numpy() for part in torch.split(displacement, counts)]


@torch.no_grad()
def refine_crystals(model, tokenizer, crystals: list[text_format.CrystalText], sigma_start: float | None = None,
                    steps: int | None = None) -> list[text_format.CrystalText]:
    """The crystals moved toward equilibrium by the model's refinement head: `steps` deterministic denoising
    steps from noise level `sigma_start` (Å; defaults: the head's saved settings) down to zero. A crystal whose
    step would not make a valid cell keeps its last valid state.

    >>> from crystallm.configuration import CrystaLLMConfig
    >>> from crystallm.modeling import CrystaLLMForCausalLM
    >>> from crystallm.tokenization import CrystaLLMTokenizer
    >>> tokenizer = CrystaLLMTokenizer.from_format()
    >>> model = CrystaLLMForCausalLM(CrystaLLMConfig(n_layer=1, n_embd=32, n_head=2, refiner={"width": 16}))
    >>> text = "data_NaCl\\n_space_group_name_H-M_alt P4/mmm\\n_cell_formula_units_Z 1\\n_cell_length_a 3.95\\n" + \\
    ...     "_cell_length_c 4.02\\n" + text_format.LOOP_HEADER + "\\nNa 1a . . .\\nCl 1d . . ."
    >>> refined = refine_crystals(model.eval(), tokenizer, [text_format.read_crystal_text(text)])[0]
    >>> refined.space_group, 3.0 < refined.lattice_parameters[0] < 5.0
    (123, True)
    """
    head = model.refiner
    sigma_start = sigma_start or head.sigma_start
    steps = steps or head.steps
    hidden = site_hidden_states(model, tokenizer, crystals)
    sigmas = np.geomspace(sigma_start, sigma_start / 10, steps).tolist() + [0.0]
    current = list(crystals)
    for sigma, following in itertools.pairwise(sigmas):
        geometries = [CrystalGeometry.from_crystal(crystal) for crystal in current]
        batch = geometry_batch(geometries, hidden, head.cutoff, head.max_neighbours)
        displacement, strain = head.denoise(batch, torch.full((len(current),), sigma, device=batch.vectors.device))
        # The probability-flow step of a variance-exploding diffusion: toward the predicted clean structure by
        # the share of the noise level this step removes.
        fraction = 1.0 - following / sigma
        strains = strain.double().cpu().numpy()
        # Each crystal's shortest distance now, from the pairs the head just read (the nearest is among them).
        shortest = torch.full((len(current),), float("inf")).scatter_reduce(
            0, batch.crystal[batch.centers].cpu(), batch.vectors.norm(dim=-1).cpu(), "amin").tolist()
        for index, (geometry, moves) in enumerate(zip(geometries, _split_by_crystal(batch, displacement))):
            moved = geometry.moved(moves * fraction, strains[index] * fraction)
            try:
                text_format.crystal_text_to_structure(moved)
            except CrystaLLMInputError:
                continue
            floor = min(validity.MIN_DISTANCE, shortest[index])
            if CrystalGeometry.from_crystal(moved).shortest_distance() >= floor:
                current[index] = moved
    return current


def refine_texts(model, tokenizer, texts: list[str]) -> list[text_format.CrystalText]:
    """`refine_crystals` of parseable texts."""
    return refine_crystals(model, tokenizer, [text_format.read_crystal_text(text) for text in texts])


@dataclass
class DenoisingError:
    """How far noised structures sit from their clean originals before and after the head refines them, at one
    noise level: median per-crystal RMSD of the atoms (Å) and mean relative error of the cell lengths, over
    `crystals`."""

    sigma: float
    rmsd_before: float
    rmsd_after: float
    length_error_before: float
    length_error_after: float
    crystals: int


def _distance(geometry: CrystalGeometry, clean: CrystalGeometry) -> tuple[float, float]:
    displacement, _ = geometry.displacement_to(clean)
    lengths = np.array(geometry.crystal.lattice_parameters[:3]) / np.array(clean.crystal.lattice_parameters[:3])
    return float(np.sqrt((displacement ** 2).sum(axis=1).mean())), float(np.abs(lengths - 1).mean())


def denoising_errors(model, tokenizer, crystals: list[text_format.CrystalText], sigmas: list[float], seed: int = 0,
                     batch_size: int = 64) -> list[DenoisingError]:
    """Held-out denoising: each crystal noised at each level (as in training, written as text), then refined by
    the head starting from that level; errors before and after against the clean crystal.

    >>> from crystallm.configuration import CrystaLLMConfig
    >>> from crystallm.modeling import CrystaLLMForCausalLM
    >>> from crystallm.tokenization import CrystaLLMTokenizer
    >>> model = CrystaLLMForCausalLM(CrystaLLMConfig(n_layer=1, n_embd=32, n_head=2, refiner={"width": 16})).eval()
    >>> crystal = text_format.read_crystal_text("data_NaCl\\n_space_group_name_H-M_alt Fm-3m\\n"
    ...     "_cell_formula_units_Z 4\\n_cell_length_a 5.69\\n" + text_format.LOOP_HEADER +
    ...     "\\nNa 4a . . .\\nCl 4b . . .")
    >>> [error] = denoising_errors(model, CrystaLLMTokenizer.from_format(), [crystal], [0.1])
    >>> error.rmsd_before, error.length_error_before > 0  # NaCl has no free coordinate, only its cell moves
    (0.0, True)
    """
    rng = np.random.default_rng(seed)
    clean = [CrystalGeometry.from_crystal(crystal) for crystal in crystals]
    errors = []
    for sigma in sigmas:
        noisy = [noised_as_written(geometry, sigma, model.refiner.lattice_noise, rng) for geometry in clean]
        errors.append(_refinement_error(model, tokenizer, [(n, c) for n, c in zip(noisy, clean) if n is not None],
                                        sigma, batch_size))
    return errors


def pair_errors(model, tokenizer, pairs: list[tuple[text_format.CrystalText, text_format.CrystalText]],
                batch_size: int = 64, within: float | None = None) -> DenoisingError:
    """Held-out (sampled, true) pairs of `generation.skeleton.sample_on_skeleton`: how far the model's own numbers
    sit from the true ones before and after the head refines them (from its `sigma_start`, as in generation).
    `within` (Å): only the pairs whose sites sit at most that RMSD from the truth (beyond it the model placed
    them another way, which no refinement undoes)."""
    pairs = [(sampled, CrystalGeometry.from_crystal(true)) for sampled, true in pairs]
    if within is not None:
        pairs = [(s, t) for s, t in pairs if _distance(CrystalGeometry.from_crystal(s), t)[0] <= within]
        if not pairs:
            raise CrystaLLMInputError(f"no pair sits within {within} Å of its true structure")
    return _refinement_error(model, tokenizer, pairs, model.refiner.sigma_start, batch_size)


def _refinement_error(model, tokenizer, kept: list[tuple[text_format.CrystalText, CrystalGeometry]], sigma: float,
                      batch_size: int) -> DenoisingError:
    refined = []
    for start in range(0, len(kept), batch_size):
        refined += refine_crystals(model, tokenizer, [n for n, _ in kept[start:start + batch_size]], sigma_start=sigma)
    before = np.array([_distance(CrystalGeometry.from_crystal(n), c) for n, c in kept])
    after = np.array([_distance(CrystalGeometry.from_crystal(r), c) for r, (_, c) in zip(refined, kept)])
    return DenoisingError(sigma, float(np.median(before[:, 0])), float(np.median(after[:, 0])),
                          float(before[:, 1].mean()), float(after[:, 1].mean()), len(kept))


def noised_as_written(geometry: CrystalGeometry, sigma: float, lattice_noise: float,
                      rng: np.random.Generator) -> text_format.CrystalText | None:
    """`perturbed`, then written as text and read back (the text's precision, as the LM writes it); None when
    the noise made the text invalid (a cell that does not close)."""
    try:
        noisy = text_format.read_crystal_text(text_format.format_crystal_text(
            geometry.perturbed(sigma, lattice_noise, rng)))
        text_format.crystal_text_to_structure(noisy)
    except CrystaLLMInputError:
        return None
    return noisy
