"""Configuration of the crystallm GPT (model code lives in `crystallm.modeling`)."""

from __future__ import annotations

from transformers import PretrainedConfig


class CrystaLLMConfig(PretrainedConfig):
    """Hyperparameters of a crystallm GPT, saved as `config.json` next to the weights.

    >>> config = CrystaLLMConfig(n_layer=2, n_embd=64, n_head=4)
    >>> config.model_type, config.n_layer
    ('crystallm', 2)
    """

    model_type = "crystallm"
    attribute_map = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer",
                     "num_attention_heads": "n_head", "max_position_embeddings": "n_positions"}

    def __init__(self, vocab_size: int = 1394, n_positions: int = 512, n_embd: int = 256, n_layer: int = 6,
                 n_head: int = 8, dropout: float = 0.0, layer_norm_epsilon: float = 1e-5,
                 initializer_range: float = 0.02, bos_token_id: int = 1, eos_token_id: int = 2,
                 pad_token_id: int = 0, mask_token_id: int = 4, tie_word_embeddings: bool = True, **kwargs):
        self.vocab_size = vocab_size
        self.n_positions = n_positions
        self.n_embd = n_embd
        self.n_layer = n_layer
        self.n_head = n_head
        self.dropout = dropout
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.mask_token_id = mask_token_id
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
