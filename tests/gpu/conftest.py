"""Fixtures of the GPU tests (tests/gpu/marks.py: how they are marked and skipped)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def still_backbone(tmp_path_factory) -> str:
    """The tiny random BERT of tests/conftest.py without dropout: a CPU and a CUDA step see the same network."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from speclora.backbone import default_backbone_path

    out = tmp_path_factory.mktemp("tiny_bert_no_dropout")
    tok = AutoTokenizer.from_pretrained(str(default_backbone_path()))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)
