"""The crystallm GPT: transformers' GPT-2 (blocks, SDPA attention, KV cache, `generate`) with a tied LM head,
a projection for the contrastive objective, the three pretraining losses computed in `forward`, and the
continuous refinement head.

- Causal LM: next-token cross-entropy over `labels` (GPT-2's own loss; `generate` calls the same `forward`).
- Masked-atom prediction: element tokens of the atom-site rows replaced by `<mask>`, predicted through a
  bidirectional pass of the same weights (a padding-only 4D attention mask turns causal masking off).
- Contrastive: InfoNCE between pooled embeddings of two equivalent serializations of each crystal in a batch.
- Refinement head (`crystallm.refinement.CrystalRefiner`, its one home): a denoiser of the crystal's geometry over
  periodic neighbour pairs, conditioned on the GPT's hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import GPT2LMHeadModel
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

from crystallm.configuration import CrystaLLMConfig
from crystallm.errors import CheckpointError
from crystallm.model_folder import check_model_folder, require_safetensors
from crystallm.refinement.network import CrystalRefiner


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
