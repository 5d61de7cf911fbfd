"""Structures in and out: the crystallm text format (`text_format`, the only definition of the format), CIF
reading and writing (`cif`), and the round-trip check of format and tokenizer on real structures (`round_trip`)."""
