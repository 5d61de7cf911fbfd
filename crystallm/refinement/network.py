"""The refinement head's network (docs/model-pretraining-decoding.md, "The refinement head"): `CrystalRefiner`,
a score model of crystal geometry over periodic neighbour pairs, conditioned on the GPT's hidden states. The model
holds it as `model.refiner` (`crystallm.modeling`); `crystallm.refinement.inference` runs it on crystals and
`crystallm.refinement.training` trains it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

MAX_ATOMIC_NUMBER = 103


# Frequencies of the log noise level's Fourier features (the head sees sigma from 0.005 to 1 Å).
LEVEL_FREQUENCIES = torch.tensor([0.25, 0.5, 1.0, 2.0])


@dataclass
class GeometryBatch:
    """The tensors the refinement head reads: a batch of crystals as atoms and periodic neighbour pairs.

    `crystallm.refinement.inference.geometry_batch` builds it from CrystalTexts. Atoms of all crystals are
    stacked; `crystal` says which crystal each atom belongs to. `centers`, `neighbours`: the atom indices of each
    pair; `vectors`: Cartesian vector (Å) from the center to that periodic image of the neighbour."""

    elements: torch.Tensor  # (atoms,) atomic numbers
    hidden: torch.Tensor  # (atoms, n_embd) the GPT's hidden state at the atom's site row
    crystal: torch.Tensor  # (atoms,)
    centers: torch.Tensor  # (pairs,)
    neighbours: torch.Tensor  # (pairs,)
    vectors: torch.Tensor  # (pairs, 3)
    crystals: int


def _radial_basis(distances: torch.Tensor, cutoff: float, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussians over [0, cutoff] and a smooth envelope that takes a pair to 0 at the cutoff."""
    centers = torch.linspace(0.0, cutoff, size, device=distances.device)
    width = cutoff / size
    basis = torch.exp(-((distances[:, None] - centers) / width) ** 2)
    envelope = 0.5 * (torch.cos(math.pi * (distances / cutoff).clamp(max=1.0)) + 1.0)
    return basis * envelope[:, None], envelope


@dataclass
class RefinerOutput(ModelOutput):
    """The refinement head's losses: `loss` is the sum of the coordinate term (a mean over atoms) and the lattice
    term (a mean over crystals)."""

    loss: torch.FloatTensor | None = None
    coordinate_loss: torch.FloatTensor | None = None
    lattice_loss: torch.FloatTensor | None = None


class CrystalRefiner(nn.Module):
    """The refinement head: a denoiser of crystal geometry, a score model in the manner of MatterGen's
    coordinate and lattice diffusion. It reads the atoms of a cell with their periodic neighbours (distances and
    directions), element embeddings, the GPT's hidden state at each atom's site row and the noise level `sigma`
    (Å), and predicts each atom's Cartesian displacement back to the clean structure and the cell's strain.

    Both outputs are sums over neighbour pairs of learned invariant weights times the pair's direction (and its
    outer product for the strain), so they turn with the crystal and respect its symmetry; the caller projects
    them onto the free Wyckoff and lattice parameters (`crystallm.refinement.inference`). `forward` is the
    denoising score-matching loss; `denoise` one prediction.

    >>> refiner = CrystalRefiner(hidden_size=8, width=16, layers=1)
    >>> batch = GeometryBatch(torch.tensor([11, 17]), torch.zeros(2, 8), torch.tensor([0, 0]), torch.tensor([0, 1]),
    ...                       torch.tensor([1, 0]), torch.tensor([[2.8, 0.0, 0.0], [-2.8, 0.0, 0.0]]), crystals=1)
    >>> displacement, strain = refiner.denoise(batch, torch.tensor([0.1]))
    >>> displacement.shape, strain.shape
    (torch.Size([2, 3]), torch.Size([1, 3, 3]))
    """

    def __init__(self, hidden_size: int, width: int = 64, layers: int = 3, radial: int = 16, cutoff: float = 6.0,
                 max_neighbours: int = 24, lattice_noise: float = 0.2, sigma_start: float = 0.1, steps: int = 4,
                 on_by_default: bool = True):
        super().__init__()
        # Every argument but the GPT's width, as the model's config saves it: the head is rebuilt from them alone.
        self.settings = {"width": width, "layers": layers, "radial": radial, "cutoff": cutoff,
                         "max_neighbours": max_neighbours, "lattice_noise": lattice_noise,
                         "sigma_start": sigma_start, "steps": steps, "on_by_default": on_by_default}
        # Whether `generate` refines when not told: a head ships switched off where it was measured not to help.
        self.on_by_default = on_by_default
        self.radial, self.cutoff, self.max_neighbours = radial, cutoff, max_neighbours
        # Strain noise (dimensionless) per Å of coordinate noise: both come from one level sigma.
        self.lattice_noise = lattice_noise
        self.sigma_start, self.steps = sigma_start, steps
        self.element = nn.Embedding(MAX_ATOMIC_NUMBER + 1, width)
        self.hidden = nn.Linear(hidden_size, width)
        self.level = nn.Sequential(nn.Linear(2 * len(LEVEL_FREQUENCIES), width), nn.SiLU(), nn.Linear(width, width))
        pair_features = 2 * width + radial
        self.messages = nn.ModuleList(
            nn.Sequential(nn.Linear(pair_features, width), nn.SiLU(), nn.Linear(width, width)) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(layers))
        self.pair_out = nn.Sequential(nn.Linear(pair_features, width), nn.SiLU(), nn.Linear(width, 2))
        self.isotropic = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))

    def denoise(self, batch: GeometryBatch, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted displacement of each atom (atoms, 3; Å) and strain of each cell (crystals, 3, 3) back to the
        clean structure; `sigma` (crystals,) is each crystal's noise level in Å."""
        distances = batch.vectors.norm(dim=-1).clamp(min=1e-6)
        directions = batch.vectors / distances[:, None]
        basis, envelope = _radial_basis(distances, self.cutoff, self.radial)
        angles = torch.log(sigma)[:, None] * LEVEL_FREQUENCIES.to(sigma.device)
        level = self.level(torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1))
        # Elements past Lr (Z > 103; never in the data, possible from an untrained model) share slot 0.
        elements = torch.where(batch.elements <= MAX_ATOMIC_NUMBER, batch.elements, 0)
        h = self.element(elements) + self.hidden(batch.hidden) + level[batch.crystal]
        scale = 1.0 / math.sqrt(self.max_neighbours)
        for message, norm in zip(self.messages, self.norms):
            pair = message(torch.cat([h[batch.centers], h[batch.neighbours], basis], dim=-1)) * envelope[:, None]
            h = norm(h + torch.zeros_like(h).index_add_(0, batch.centers, pair) * scale)
        weights = self.pair_out(torch.cat([h[batch.centers], h[batch.neighbours], basis], dim=-1))
        weights = weights * envelope[:, None] * scale
        atom_sigma = sigma[batch.crystal]
        displacement = torch.zeros_like(h[:, :3]).index_add_(0, batch.centers, weights[:, :1] * directions)
        displacement = displacement * atom_sigma[:, None]
        outer = weights[:, 1, None, None] * directions[:, :, None] * directions[:, None, :]
        atom_strain = torch.zeros(len(h), 3, 3, device=h.device).index_add_(0, batch.centers, outer)
        atom_strain = atom_strain + self.isotropic(h)[:, :, None] * torch.eye(3, device=h.device)
        counts = torch.zeros(batch.crystals, device=h.device).index_add_(0, batch.crystal, torch.ones_like(atom_sigma))
        strain = torch.zeros(batch.crystals, 3, 3, device=h.device).index_add_(0, batch.crystal, atom_strain)
        strain = strain / counts.clamp(min=1)[:, None, None] * (sigma * self.lattice_noise)[:, None, None]
        return displacement, strain

    def forward(self, batch: GeometryBatch, sigma: torch.Tensor, displacement: torch.Tensor,
                strain: torch.Tensor) -> RefinerOutput:
        """Denoising score-matching loss: squared error of the predicted displacements (a mean over atoms) and
        strains (a mean over crystals) against the true ones, each in units of its noise level so every level
        weighs alike."""
        predicted_displacement, predicted_strain = self.denoise(batch, sigma)
        atom_sigma = sigma[batch.crystal][:, None]
        coordinates = ((predicted_displacement - displacement) / atom_sigma).pow(2).sum(-1).mean()
        lattice = ((predicted_strain - strain) / (sigma * self.lattice_noise)[:, None, None]).pow(2).sum((1, 2))
        return RefinerOutput(coordinates + lattice.mean(), coordinates, lattice.mean())
