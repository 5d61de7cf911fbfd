"""The crystallm GPT: transformers' GPT-2 (blocks, SDPA attention, KV cache, `generate`) with a tied LM head,
a projection for the contrastive objective, the three pretraining losses computed in `forward`, and the
continuous refinement head.

- Causal LM: next-token cross-entropy over `labels` (GPT-2's own loss; `generate` calls the same `forward`).
- Masked-atom prediction: element tokens of the atom-site rows replaced by `<mask>`, predicted through a
  bidirectional pass of the same weights (a padding-only 4D attention mask turns causal masking off).
- Contrastive: InfoNCE between pooled embeddings of two equivalent serializations of each crystal in a batch.
- Refinement head (`CrystalRefiner`): a small denoiser over the continuous values of a text (free lattice
  parameters, free Wyckoff coordinates), conditioned on the GPT's hidden states; `crystallm.generation.refinement`
  runs it and `crystallm.training.refiner` trains it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2LMHeadModel
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

from crystallm.configuration import CrystaLLMConfig
from crystallm.errors import CheckpointError

# The refinement head's kinds of value, and their normalization (log-length, degrees, fraction): one unit is
# about a typical LM error.
LENGTH, ANGLE, COORDINATE = 0, 1, 2
SCALES = torch.tensor([0.02, 1.0, 0.02])
FOURIER_FREQUENCIES = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0])


def periodic_difference(delta: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
    """Differences of fractional coordinates taken the short way round the unit circle."""
    return torch.where(kinds == COORDINATE, delta - torch.round(delta), delta)


class CrystalRefiner(nn.Module):
    """The denoiser: (hidden states, kinds, coarse values, noisy values, noise level) -> predicted clean values.

    `forward` is the training loss (denoising score matching), `denoise` one prediction, `refine` the sampler.

    >>> refiner = CrystalRefiner(hidden_size=32, width=16, layers=1, heads=2)
    >>> shape = (2, 5)
    >>> out = refiner.denoise(torch.zeros(*shape, 32), torch.full(shape, 2), torch.rand(shape), torch.rand(shape),
    ...                       torch.ones(2), torch.ones(shape, dtype=torch.bool))
    >>> out.shape
    torch.Size([2, 5])
    """

    def __init__(self, hidden_size: int, width: int = 128, layers: int = 2, heads: int = 4, sigma_start: float = 1.0,
                 steps: int = 8):
        super().__init__()
        # Every argument but the GPT's width, as the model's config saves it: the head is rebuilt from them alone.
        self.settings = {"width": width, "layers": layers, "heads": heads, "sigma_start": sigma_start, "steps": steps}
        self.sigma_start, self.steps = sigma_start, steps
        features = 2 * len(FOURIER_FREQUENCIES) + 3  # Fourier of the noisy value, offsets, log noise level
        self.hidden = nn.Linear(hidden_size, width)
        self.kind = nn.Embedding(3, width)
        self.values = nn.Sequential(nn.Linear(features, width), nn.GELU(), nn.Linear(width, width))
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(width, 1)

    def denoise(self, hidden: torch.Tensor, kinds: torch.Tensor, coarse: torch.Tensor, noisy: torch.Tensor,
                sigma: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Predicted clean values (same units as the inputs) for each slot; `sigma` is per structure, normalized."""
        scale = SCALES.to(noisy.device)[kinds]
        offset = periodic_difference(noisy - coarse, kinds) / scale
        angle = 2 * math.pi * noisy.unsqueeze(-1) * FOURIER_FREQUENCIES.to(noisy.device)
        is_coordinate = (kinds == COORDINATE).unsqueeze(-1).float()
        fourier = torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1) * is_coordinate
        level = torch.log(sigma)[:, None, None].expand(*noisy.shape, 1)
        absolute = torch.where(kinds == ANGLE, noisy / 90 - 1, torch.where(kinds == LENGTH, noisy - 1.5, 0 * noisy))
        features = torch.cat([fourier, offset.unsqueeze(-1), absolute.unsqueeze(-1), level], dim=-1)
        x = self.hidden(hidden) + self.kind(kinds) + self.values(features)
        x = self.encoder(x, src_key_padding_mask=~mask)
        step = self.out(x).squeeze(-1) * scale  # predicted (clean - noisy), in value units
        return noisy + step

    def forward(self, hidden: torch.Tensor, kinds: torch.Tensor, coarse: torch.Tensor, clean: torch.Tensor,
                mask: torch.Tensor, sigma_range: tuple[float, float],
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Denoising loss: noise the clean values at a random level per structure, predict them back (normalized
        squared error over the real slots)."""
        batch = clean.shape[0]
        low, high = math.log(sigma_range[0]), math.log(sigma_range[1])
        sigma = torch.exp(torch.rand(batch, generator=generator) * (high - low) + low).to(clean.device)
        scale = SCALES.to(clean.device)[kinds]
        noise = torch.randn(clean.shape, generator=generator).to(clean.device)
        noisy = clean + sigma[:, None] * scale * noise
        noisy = torch.where(kinds == COORDINATE, noisy % 1.0, noisy)
        predicted = self.denoise(hidden, kinds, coarse, noisy, sigma, mask)
        error = periodic_difference(predicted - clean, kinds) / scale
        return (error.pow(2) * mask).sum() / mask.sum().clamp(min=1)

    @torch.no_grad()
    def refine(self, hidden: torch.Tensor, kinds: torch.Tensor, coarse: torch.Tensor, mask: torch.Tensor,
               sigma_start: float | None = None, steps: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample clean values starting from the coarse ones at noise level `sigma_start` (normalized units),
        with `steps` deterministic denoising steps down a geometric schedule (the probability-flow update of a
        variance-exploding diffusion)."""
        sigma_start, steps = sigma_start or self.sigma_start, steps or self.steps
        scale = SCALES.to(coarse.device)[kinds]
        sigmas = torch.exp(torch.linspace(math.log(sigma_start), math.log(sigma_start / 20), steps)).tolist() + [0.0]
        noise = torch.randn(coarse.shape, generator=generator).to(coarse.device)
        x = coarse + sigmas[0] * scale * noise
        for sigma, following in zip(sigmas[:-1], sigmas[1:]):
            x = torch.where(kinds == COORDINATE, x % 1.0, x)
            clean = self.denoise(hidden, kinds, coarse, x, torch.full((x.shape[0],), sigma, device=x.device), mask)
            x = clean + (following / sigma) * periodic_difference(x - clean, kinds)
        return torch.where(kinds == COORDINATE, x % 1.0, x)


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

    config_file = Path(path) / "config.json"
    if Path(path).exists():  # a local folder (anything else is taken for a Hub id)
        try:
            model_type = json.loads(config_file.read_text()).get("model_type")
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{path}: not a model folder (config.json: {error})") from None
        if model_type != CrystaLLMConfig.model_type:
            raise CheckpointError(f"{path}: not a crystallm model (its config.json says model_type {model_type!r})")
    try:
        model, info = CrystaLLMForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise CheckpointError(f"{path}: cannot load the checkpoint ({type(error).__name__}: {error})") from error
    problems = {key: list(value) for key, value in info.items() if value and key != "error_msgs"}
    if problems or info.get("error_msgs"):
        raise CheckpointError(f"{path}: the checkpoint does not fit the model: {problems or info['error_msgs']}")
    return model
