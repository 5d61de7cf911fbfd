"""Round-trip checks of the text format and tokenizer on real structures (used by eval/format_roundtrip.py)."""

from __future__ import annotations

import time

from pymatgen.analysis.structure_matcher import StructureMatcher

from crystallm.errors import CrystaLLMInputError
from crystallm.io import text_format
from crystallm.io.cif import structure_from_cif

_MATCHER = StructureMatcher()
# Default tolerances, no reduction to a primitive cell, supercells allowed: tells StructureMatcher's own
# quirk (pseudo-translations found at its 0.25 Å primitive-cell tolerance) from a real round-trip failure.
_MATCHER_SUPERCELL = StructureMatcher(primitive_cell=False, attempt_supercell=True)


def check_round_trip(cif: str, name: str, tokenizer) -> dict:
    """Serialize a CIF's structure, tokenize and decode the text, parse it back and compare.

    Returns a flat record: n_tokens (text only, no <bos>/<eos>), text_round_trip (decode(encode) == text),
    matched (StructureMatcher, default tolerances, against the parsed primitive cell), matched_supercell and
    rms (the same tolerances, supercells allowed, no primitive reduction), error, and timings in seconds.

    >>> from crystallm.tokenization import CrystaLLMTokenizer
    >>> from pymatgen.core import Lattice, Structure
    >>> cif = Structure(Lattice.cubic(4.2), ["Cs", "Cl"], [[0, 0, 0], [.5, .5, .5]]).to(fmt="cif")
    >>> record = check_round_trip(cif, "CsCl", CrystaLLMTokenizer.from_format())
    >>> record["matched"], record["text_round_trip"], record["n_tokens"]
    (True, True, 21)
    """
    record = {"n_tokens": -1, "text_round_trip": False, "matched": False, "matched_supercell": False,
              "rms": -1.0, "error": "", "serialize_s": 0.0, "tokenize_s": 0.0, "text": ""}
    try:
        structure = structure_from_cif(cif, name)
        start = time.perf_counter()
        text = text_format.serialize_structure(structure)
        record["serialize_s"] = time.perf_counter() - start
        start = time.perf_counter()
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        record["tokenize_s"] = time.perf_counter() - start
        record.update(text=text, n_tokens=len(ids),
                      text_round_trip=tokenizer.decode(ids) == text and tokenizer.unk_token_id not in ids)
        record["matched"] = bool(_MATCHER.fit(structure, text_format.parse_structure(text, primitive=True)))
        rms = _MATCHER_SUPERCELL.get_rms_dist(structure, text_format.parse_structure(text))
        record.update(matched_supercell=rms is not None, rms=float(rms[0]) if rms is not None else -1.0)
    except CrystaLLMInputError as error:
        record["error"] = f"{type(error).__name__}: {error}"
    return record
