"""Configuration of the crystallm GPT: GPT-2's hyperparameters plus the pretraining objectives."""

from __future__ import annotations

from transformers import GPT2Config


class CrystaLLMConfig(GPT2Config):
    """Hyperparameters of a crystallm GPT, saved as `config.json` next to the weights.

    Dropout defaults to 0: on CPU, attention dropout makes SDPA fall back to its slow path (2-3x slower).
    The three pretraining objectives have a weight each; a weight of 0 switches that objective off. `refiner`
    (a dict of `crystallm.refinement.CrystalRefiner` arguments, or None) adds the geometry refinement head.

    >>> config = CrystaLLMConfig(n_layer=2, n_embd=64, n_head=4)
    >>> config.model_type, config.n_layer, config.attn_pdrop
    ('crystallm', 2, 0.0)
    """

    model_type = "crystallm"

    def __init__(self, vocab_size: int = 1394, n_positions: int = 512, n_embd: int = 256, n_layer: int = 6,
                 n_head: int = 8, clm_weight: float = 1.0, masked_atom_weight: float = 0.0,
                 contrastive_weight: float = 0.0, contrastive_dim: int = 128,
                 contrastive_temperature: float = 0.1, bos_token_id: int = 1, eos_token_id: int = 2,
                 pad_token_id: int = 0, mask_token_id: int = 4, refiner: dict | None = None, **kwargs):
        for dropout in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            kwargs.setdefault(dropout, 0.0)
        self.clm_weight = clm_weight
        self.masked_atom_weight = masked_atom_weight
        self.contrastive_weight = contrastive_weight
        self.contrastive_dim = contrastive_dim
        self.contrastive_temperature = contrastive_temperature
        self.mask_token_id = mask_token_id
        self.refiner = refiner
        super().__init__(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                         n_head=n_head, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         pad_token_id=pad_token_id, **kwargs)
