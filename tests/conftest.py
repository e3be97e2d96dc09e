"""Shared fixtures: the real data folder and a tiny random BERT encoder (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if os.environ.get("SPECLORA_DATA"):  # absolute, so a test that changes the working folder still finds the data
    os.environ["SPECLORA_DATA"] = str(Path(os.environ["SPECLORA_DATA"]).resolve())


def _data_root() -> Path:
    env = os.environ.get("SPECLORA_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real GLUE/SuperGLUE files (SPECLORA_DATA, else ../shared/data beside the checkout)."""
    root = _data_root()
    if not (root / "glue").is_dir():
        raise FileNotFoundError(
            f"GLUE/SuperGLUE data not found at {root}: set SPECLORA_DATA to the folder holding glue/ and superglue/"
        )
    return root


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> str:
    """A 2-layer, 32-wide random BERT saved with the packaged MiniLM tokenizer; returns its folder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from speclora.backbone import default_backbone_path

    out = tmp_path_factory.mktemp("tiny_bert")
    tok = AutoTokenizer.from_pretrained(str(default_backbone_path()))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)
