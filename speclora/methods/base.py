"""The Method interface lives in :mod:`speclora.model.method` (the LightningModule is handed a method and
model/ imports nothing of methods/); a method file subclasses it as ``from speclora.methods.base import
Method``, the same class."""

from speclora.model.method import Method

__all__ = ["Method"]
