"""crystallm: generate inorganic crystal structures with a language model over a compact CIF-like text.

Importing the package registers its classes with transformers' Auto classes, so
`AutoTokenizer.from_pretrained(dir)` and `AutoConfig.from_pretrained(dir)` work on saved directories.
"""

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from crystallm.configuration import CrystaLLMConfig
from crystallm.errors import CrystaLLMInputError, InvalidStructureError, MalformedCIFError, MalformedTextError
from crystallm.io.cif import structure_from_cif, structure_to_cif
from crystallm.io.text_format import parse_structure, serialize_structure
from crystallm.modeling import CrystaLLMForCausalLM
from crystallm.tokenization import CrystaLLMTokenizer

AutoConfig.register(CrystaLLMConfig.model_type, CrystaLLMConfig, exist_ok=True)
AutoTokenizer.register(CrystaLLMConfig, tokenizer_class=CrystaLLMTokenizer, exist_ok=True)
AutoModelForCausalLM.register(CrystaLLMConfig, CrystaLLMForCausalLM, exist_ok=True)

__version__ = "0.1.0"
__all__ = ["CrystaLLMConfig", "CrystaLLMForCausalLM", "CrystaLLMTokenizer", "CrystaLLMInputError",
           "InvalidStructureError", "MalformedCIFError", "MalformedTextError", "parse_structure", "serialize_structure",
           "structure_from_cif", "structure_to_cif"]
