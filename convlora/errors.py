"""The error convlora raises for files it cannot read as what they claim to be.

:class:`LoRAFileError` lives here so that every module that reads files (the header reader, the
native ``io`` module, the format readers) can raise it without importing each other; it is
re-exported as ``convlora.io.LoRAFileError`` and ``convlora.LoRAFileError``. The other named errors
stay beside the code that raises them: ``convlora.state.StateDictMismatchError``,
``convlora.formats.LoRAFormatError`` (a ``LoRAFileError``), ``convlora.quant.QuantizationError``, ``convlora.training.data.DataError``
and ``convlora.training.checkpoints.CheckpointError``. All are ``ValueError`` subclasses.
"""

from __future__ import annotations


class LoRAFileError(ValueError):
    """A file is missing, unreadable, not safetensors, or not the kind of LoRA file expected."""
