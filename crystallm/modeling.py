"""The crystallm GPT: transformers' GPT-2 (blocks, SDPA attention, KV cache, `generate`) with a tied LM head,
a projection for the contrastive objective, and the three pretraining losses.

- Causal LM: next-token cross-entropy (the inherited `forward`, which `generate` uses).
- Masked-atom prediction: element tokens of the atom-site rows replaced by `<mask>`, predicted through a
  bidirectional pass of the same weights (a padding-only 4D attention mask turns causal masking off).
- Contrastive: InfoNCE between pooled embeddings of two equivalent serializations of each crystal in a batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2LMHeadModel

from crystallm.configuration import CrystaLLMConfig
from crystallm.diffusion import CrystalRefiner


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
        # The continuous refinement head (crystallm/diffusion.py), saved with the model when the config has one.
        self.refiner = CrystalRefiner(config.n_embd, **config.refiner) if config.refiner else None
        self.post_init()

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **kwargs):
        """GPT-2's forward, with positions counted from the attention mask when none are given, so a left-padded
        row keeps its positions in every call (HF's classifier-free guidance runs its unconditional pass without
        position ids; `generate` itself passes them)."""
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2 and input_ids is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)

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

    def pretraining_losses(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           masked_input_ids: torch.Tensor | None = None, masked_labels: torch.Tensor | None = None,
                           view_input_ids: torch.Tensor | None = None,
                           view_attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Each enabled objective's loss and their weighted sum under "loss".

        masked_labels holds the original token where an element was masked and -100 elsewhere; the view is a
        second serialization of the same crystals, row for row.
        """
        config = self.config
        losses: dict[str, torch.Tensor] = {}
        hidden = self.encode(input_ids, attention_mask)
        if config.clm_weight:
            logits = self.lm_head(hidden[:, :-1])
            labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
            losses["clm"] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
        if config.masked_atom_weight and masked_input_ids is not None:
            selected = masked_labels != -100
            masked_hidden = self.encode(masked_input_ids, attention_mask, bidirectional=True)[selected]
            losses["masked_atom"] = F.cross_entropy(self.lm_head(masked_hidden).float(), masked_labels[selected])
        if config.contrastive_weight and view_input_ids is not None:
            anchor = F.normalize(self.contrastive_projection(self.pooled_embedding(
                input_ids, attention_mask, hidden)), dim=-1)
            positive = F.normalize(self.contrastive_projection(self.pooled_embedding(
                view_input_ids, view_attention_mask)), dim=-1)
            similarity = (anchor @ positive.T).float() / config.contrastive_temperature
            targets = torch.arange(similarity.shape[0], device=similarity.device)
            losses["contrastive"] = (F.cross_entropy(similarity, targets) + F.cross_entropy(similarity.T, targets)) / 2
        weights = {"clm": config.clm_weight, "masked_atom": config.masked_atom_weight,
                   "contrastive": config.contrastive_weight}
        losses["loss"] = sum(weights[name] * value for name, value in losses.items())
        return losses


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

    from crystallm.errors import CheckpointError

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
