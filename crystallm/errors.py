"""Exceptions for bad input. Each message names the input and the problem."""


class CrystaLLMInputError(ValueError):
    """Base class: something a user gave us cannot be used as it is."""


class MalformedCIFError(CrystaLLMInputError):
    """A CIF could not be read as a crystal structure."""


class InvalidStructureError(CrystaLLMInputError):
    """A structure cannot be written in the text format (disorder, no atoms, degenerate lattice, ...)."""


class MalformedTextError(CrystaLLMInputError):
    """A text does not follow the crystallm text format."""


class WyckoffLocationError(InvalidStructureError):
    """An atom of a standardized cell lies on no Wyckoff position of the needed multiplicity."""


class OutputWriteError(OSError):
    """An output could not be written (full disk, permissions); everything finished before is kept."""


class CheckpointError(CrystaLLMInputError):
    """A model checkpoint is missing, corrupt, or does not fit the model."""


class CrystaLLMWarning(UserWarning):
    """Input that can be used but probably not as meant (e.g. a property target outside the data's range)."""
