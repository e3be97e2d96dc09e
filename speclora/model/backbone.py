"""The backbone resolver lives in :mod:`speclora.backbone` (data and model both read it); kept here so that
``from speclora.model.backbone import resolve_backbone`` still works."""

from speclora.backbone import DEFAULT_BACKBONE, default_backbone_path, resolve_backbone

__all__ = ["DEFAULT_BACKBONE", "default_backbone_path", "resolve_backbone"]
