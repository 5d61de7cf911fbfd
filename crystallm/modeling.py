"""The crystallm GPT: transformers' GPT-2 (blocks, SDPA attention, KV cache, `generate`) with a tied LM head,
a projection for the contrastive objective, the three pretraining losses computed in `forward`, and the
continuous refinement head.

- Causal LM: next-token cross-entropy over `labels` (GPT-2's own loss; `generate` calls the same `forward`).
- Masked-atom prediction: element tokens of the atom-site rows replaced by `<mask>`, predicted through a
  bidirectional pass of the same weights (a padding-only 4D attention mask turns causal masking off).
- Contrastive: InfoNCE between pooled embeddings of two equivalent serializations of each crystal in a batch.
- Refinement head (`CrystalRefiner`): a denoiser of the crystal's geometry over periodic neighbour pairs,
  conditioned on the GPT's hidden states; `crystallm.generation.refinement` runs it and `crystallm.training.refiner`
  trains it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2LMHeadModel
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions
from transformers.utils import ModelOutput

from crystallm.configuration import CrystaLLMConfig
from crystallm.errors import CheckpointError
from crystallm.model_folder import check_model_folder, require_safetensors

MAX_ATOMIC_NUMBER = 103


# Frequencies of the log noise level's Fourier features (the head sees sigma from 0.005 to 1 Å).
LEVEL_FREQUENCIES = torch.tensor([0.25, 0.5, 1.0, 2.0])


@dataclass
class GeometryBatch:
    """The tensors the refinement head reads: a batch of crystals as atoms and periodic neighbour pairs.

    `crystallm.generation.refinement.geometry_batch` builds it from CrystalTexts. Atoms of all crystals are
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
    them onto the free Wyckoff and lattice parameters (`crystallm.generation.refinement`). `forward` is the
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


@dataclass
class CrystaLLMOutput(CausalLMOutputWithCrossAttentions):
    """GPT-2's causal-LM output plus each pretraining objective's loss; `loss` is their weighted sum (the
    objectives whose inputs were given and whose weight is not 0)."""

    clm_loss: torch.FloatTensor | None = None
    masked_atom_loss: torch.FloatTensor | None = None
    contrastive_loss: torch.FloatTensor | None = None


class CrystaLLMForCausalLM(GPT2LMHeadModel):
    """GPT-2 language model over crystallm tokens, with the pretraining objectives.

    >>> config = CrystaLLMConfig(n_layer=1, n_embd=32, n_head=2, n_positions=64)
    >>> model = CrystaLLMForCausalLM(config)
    >>> ids = torch.tensor([[1, 87, 523, 529, 2]])
    >>> model(ids).logits.shape
    torch.Size([1, 5, 1394])
    """

    config_class = CrystaLLMConfig

    def __init__(self, config: CrystaLLMConfig):
        super().__init__(config)
        self.contrastive_projection = nn.Linear(config.n_embd, config.contrastive_dim, bias=False)
        # The continuous refinement head, saved with the model when the config has one.
        self.refiner = CrystalRefiner(config.n_embd, **config.refiner) if config.refiner else None
        self.post_init()

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                masked_input_ids: torch.Tensor | None = None, masked_labels: torch.Tensor | None = None,
                view_input_ids: torch.Tensor | None = None, view_attention_mask: torch.Tensor | None = None,
                **kwargs) -> CrystaLLMOutput:
        """GPT-2's forward, plus the losses of the pretraining objectives whose inputs are given (the tensors of
        `crystallm.training.collator.PretrainingCollator`): `labels` for the causal LM, `masked_input_ids` and
        `masked_labels` (the original token where an element was masked, -100 elsewhere) for masked-atom
        prediction, `view_input_ids` and `view_attention_mask` (a second serialization of the same crystals, row
        for row) for the contrastive objective.

        Positions are counted from the attention mask when none are given, so a left-padded row keeps its
        positions in every call (HF's classifier-free guidance runs its unconditional pass without position ids;
        `generate` itself passes them).

        >>> model = CrystaLLMForCausalLM(CrystaLLMConfig(n_layer=1, n_embd=32, n_head=2, masked_atom_weight=1.0))
        >>> ids = torch.tensor([[1, 87, 523, 529, 2]])
        >>> out = model(ids, labels=ids, masked_input_ids=ids.masked_fill(ids == 87, 4),
        ...             masked_labels=ids.masked_fill(ids != 87, -100))
        >>> bool(torch.isclose(out.loss, out.clm_loss + out.masked_atom_loss))
        True
        """
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2 and input_ids is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        contrastive = bool(self.config.contrastive_weight) and view_input_ids is not None
        output_hidden_states = contrastive or kwargs.pop("output_hidden_states", False)
        if labels is not None and attention_mask is not None:
            labels = labels.masked_fill(attention_mask == 0, -100)  # padding is never a target
        output = super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 labels=labels if self.config.clm_weight else None,
                                 output_hidden_states=output_hidden_states, **kwargs)
        losses: dict[str, torch.Tensor] = {}
        if output.loss is not None:
            losses["clm"] = output.loss
        if self.config.masked_atom_weight and masked_input_ids is not None:
            selected = masked_labels != -100
            masked_hidden = self.encode(masked_input_ids, attention_mask, bidirectional=True)[selected]
            losses["masked_atom"] = F.cross_entropy(self.lm_head(masked_hidden).float(), masked_labels[selected])
        if contrastive:
            anchor = F.normalize(self.contrastive_projection(self.pooled_embedding(
                input_ids, attention_mask, output.hidden_states[-1])), dim=-1)
            positive = F.normalize(self.contrastive_projection(self.pooled_embedding(
                view_input_ids, view_attention_mask)), dim=-1)
            similarity = (anchor @ positive.T).float() / self.config.contrastive_temperature
            targets = torch.arange(similarity.shape[0], device=similarity.device)
            losses["contrastive"] = (F.cross_entropy(similarity, targets) + F.cross_entropy(similarity.T, targets)) / 2
        weights = {"clm": self.config.clm_weight, "masked_atom": self.config.masked_atom_weight,
                   "contrastive": self.config.contrastive_weight}
        return CrystaLLMOutput(
            loss=sum(weights[name] * value for name, value in losses.items()) if losses else None,
            logits=output.logits, past_key_values=output.past_key_values, hidden_states=output.hidden_states,
            attentions=output.attentions, cross_attentions=output.cross_attentions,
            clm_loss=losses.get("clm"), masked_atom_loss=losses.get("masked_atom"),
            contrastive_loss=losses.get("contrastive"))

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               bidirectional: bool = False) -> torch.Tensor:
        """Final hidden states (batch, length, n_embd); causal unless `bidirectional`."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask
        if bidirectional:
            # A prepared 4D mask is used as given, so no causal mask is added: each token sees every non-pad token.
            length = input_ids.shape[1]
            mask = attention_mask[:, None, None, :].bool().expand(-1, 1, length, -1)
        return self.transformer(input_ids=input_ids, attention_mask=mask).last_hidden_state

    def pooled_embedding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of the causal hidden states over non-padding tokens: one vector per sequence (batch, n_embd)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if hidden_states is None:
            hidden_states = self.encode(input_ids, attention_mask)
        weights = attention_mask.unsqueeze(-1).to(hidden_states.dtype)
        return (hidden_states * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def load_model(path: str, **kwargs) -> CrystaLLMForCausalLM:
    """`from_pretrained` that refuses a corrupt or mismatched checkpoint instead of half-loading it (transformers
    would warn and initialize missing weights at random).

    >>> import tempfile
    >>> directory = tempfile.mkdtemp()
    >>> CrystaLLMForCausalLM(CrystaLLMConfig(n_layer=1, n_embd=32, n_head=2)).save_pretrained(directory)
    >>> load_model(directory).config.n_layer
    1
    """
    from safetensors import SafetensorError

    if Path(path).exists():  # a local folder (anything else is taken for a Hub id)
        check_model_folder(Path(path))
        require_safetensors(Path(path))
    try:
        model, info = CrystaLLMForCausalLM.from_pretrained(path, output_loading_info=True, use_safetensors=True,
                                                           **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise CheckpointError(f"{path}: cannot load the checkpoint ({type(error).__name__}: {error})") from error
    problems = {key: list(value) for key, value in info.items() if value and key != "error_msgs"}
    if problems or info.get("error_msgs"):
        raise CheckpointError(f"{path}: the checkpoint does not fit the model: {problems or info['error_msgs']}")
    return model
