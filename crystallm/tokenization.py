"""The crystallm tokenizer: one token per lexeme of the text format, built with HF `tokenizers`.

The vocabulary and the pre-tokenizer regex come from `crystallm.io.text_format`, so the tokenizer
cannot drift from the format. Each lexeme carries the whitespace before it (``"\\nGa"``, ``" 0.18"``),
so decoding is plain concatenation and ``decode(encode(text)) == text`` exactly.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from crystallm.io import text_format

BOS, EOS, PAD, MASK, UNK = "<bos>", "<eos>", "<pad>", "<mask>", "<unk>"
NUM_PROPERTY_TOKENS = 16
NUM_VALUE_TOKENS = 64
# Reserved for property conditioning: a token naming the property, one for "no condition"
# (classifier-free guidance drops the condition to it), and value tokens (bins).
PROPERTY_TOKENS = tuple(f"<prop_{i}>" for i in range(NUM_PROPERTY_TOKENS))
NO_PROPERTY_TOKEN = "<prop_none>"
VALUE_TOKENS = tuple(f"<value_{i}>" for i in range(NUM_VALUE_TOKENS))
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, MASK, NO_PROPERTY_TOKEN, *PROPERTY_TOKENS, *VALUE_TOKENS)


def build_backend_tokenizer() -> Tokenizer:
    """The `tokenizers.Tokenizer` for the current format: word-level over the format's lexemes."""
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *text_format.vocabulary()))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(text_format.LEXEME_PATTERN), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def encode_texts(tokenizer, texts: list[str], max_length: int):
    """Texts as a training-shaped batch: each with `<bos>` and `<eos>`, right-padded (positions start at 0, as in
    generation, which pads left and counts positions from the attention mask), truncated to `max_length`.

    >>> batch = encode_texts(CrystaLLMTokenizer.from_format(), ["data_NaCl", "data_Si"], 16)
    >>> batch["input_ids"].shape, batch["attention_mask"].sum(1).tolist()
    (torch.Size([2, 5]), [5, 4])
    """
    return tokenizer([text + tokenizer.eos_token for text in texts], padding=True, truncation=True,
                     max_length=max_length, return_tensors="pt", padding_side="right")


def row_element_token_ids(tokenizer) -> list[int]:
    """Ids of the element tokens that start atom-site rows ("\\nGa")."""
    return tokenizer.convert_tokens_to_ids(["\n" + symbol for symbol in text_format.element_symbols()])


def formula_element_token_ids(tokenizer) -> list[int]:
    """Ids of the element tokens of the formula line ("Ga"), in the order of `row_element_token_ids`."""
    return tokenizer.convert_tokens_to_ids(list(text_format.element_symbols()))


def element_positions(tokenizer, input_ids, symbol: str):
    """Where a text's ids carry `symbol`: in its formula and at the start of its site rows (a bool tensor). An
    element masked at all of them is hidden from a bidirectional pass, so predicting it is substitution.

    >>> tokenizer = CrystaLLMTokenizer.from_format()
    >>> ids = tokenizer("data_NaCl\\n" + text_format.LOOP_HEADER + "\\nNa 1a . . .\\nCl 1b . . .",
    ...                 return_tensors="pt")["input_ids"]
    >>> element_positions(tokenizer, ids, "Cl").nonzero()[:, 1].tolist()
    [3, 10]
    """
    import torch

    wanted = torch.tensor(tokenizer.convert_tokens_to_ids([symbol, "\n" + symbol]))
    return torch.isin(input_ids, wanted)


class CrystaLLMTokenizer(PreTrainedTokenizerFast):
    """Tokenizer for crystallm text; `AutoTokenizer.from_pretrained(dir)` returns it once crystallm is imported.

    Encoding prepends `<bos>`; training appends `<eos>`. Padding is on the left, for batched generation.

    >>> tokenizer = CrystaLLMTokenizer.from_format()
    >>> ids = tokenizer("data_NaCl\\n_space_group_name_H-M_alt Fm-3m")["input_ids"]
    >>> tokenizer.convert_ids_to_tokens(ids)
    ['<bos>', 'data_', 'Na', 'Cl', '\\n_space_group_name_H-M_alt', ' Fm-3m']
    >>> tokenizer.decode(ids, skip_special_tokens=True)
    'data_NaCl\\n_space_group_name_H-M_alt Fm-3m'
    """

    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"

    def __init__(self, *args, **kwargs):
        # The backend is the format's (transformers 5 rebuilds a subclass with its own __init__ from the saved
        # vocabulary, so it is built here, and a saved vocabulary must be exactly the format's).
        saved_version = kwargs.pop("format_version", text_format.FORMAT_VERSION)
        saved_vocab = kwargs.pop("vocab", None)
        kwargs.pop("merges", None)
        if "tokenizer_object" not in kwargs:
            backend = build_backend_tokenizer()
            if str(saved_version) != text_format.FORMAT_VERSION:
                raise ValueError(f"these tokenizer files were written for text format version {saved_version}; "
                                 f"this crystallm reads format {text_format.FORMAT_VERSION}")
            if isinstance(saved_vocab, dict) and saved_vocab != backend.get_vocab(with_added_tokens=False):
                raise ValueError("these tokenizer files hold another vocabulary than the text format's; "
                                 "rebuild them with tokenizer/build_tokenizer.py")
            kwargs["tokenizer_object"] = backend
        for key, token in (("bos_token", BOS), ("eos_token", EOS), ("pad_token", PAD),
                           ("unk_token", UNK), ("mask_token", MASK)):
            kwargs.setdefault(key, token)
        kwargs.setdefault("padding_side", "left")
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(*args, **kwargs)
        self.init_kwargs["format_version"] = text_format.FORMAT_VERSION

    @classmethod
    def from_format(cls) -> "CrystaLLMTokenizer":
        """Build the tokenizer in memory from the format definition (no files needed)."""
        return cls()

    def encode_structure(self, structure, add_eos: bool = False) -> list[int]:
        """Token ids of a pymatgen Structure's canonical text.

        >>> from pymatgen.core import Lattice, Structure
        >>> tokenizer = CrystaLLMTokenizer.from_format()
        >>> len(tokenizer.encode_structure(Structure(Lattice.cubic(4.2), ["Cs", "Cl"], [[0, 0, 0], [.5, .5, .5]])))
        22
        """
        text = text_format.serialize_structure(structure)
        return self(text + (self.eos_token if add_eos else ""))["input_ids"]

    def decode_structure(self, ids):
        """Parse generated ids back into a Structure (raises MalformedTextError on bad text).

        >>> from pymatgen.core import Lattice, Structure
        >>> tokenizer = CrystaLLMTokenizer.from_format()
        >>> ids = tokenizer.encode_structure(Structure(Lattice.cubic(4.2), ["Cs", "Cl"], [[0, 0, 0], [.5, .5, .5]]))
        >>> tokenizer.decode_structure(ids).composition.reduced_formula
        'CsCl'
        """
        return text_format.parse_structure(self.decode(ids, skip_special_tokens=True))
