"""The tiny family's text encoder, all-MiniLM-L6-v2 (a 6-layer BERT), without importing transformers.

transformers costs ~4.5 s to import on a 2-core CPU, more than the rest of a cold `fluxkit generate` with the
built-in model, so the built-in encoder is this small BERT forward (post-LayerNorm blocks, exact-erf GELU, absolute
positions; Devlin et al. 2018) over the package's own `model.safetensors` and `tokenizer.json` (read by the
`tokenizers` library). Module names equal transformers' `BertModel` keys, so the file loads strictly;
`tests/test_minilm.py` checks token states and tokenization equal transformers' on the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

UNUSED_KEYS = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")  # not part of token states


def _embedding(rows: int, dim: int) -> nn.Embedding:
    return nn.Embedding(rows, dim, _weight=torch.empty(rows, dim))


class _Embeddings(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        h = cfg["hidden_size"]
        # Tables are created empty, never initialised: the checkpoint replaces them, and nn.Embedding's normal_ init
        # on the meta device imports torch._dynamo (1.3 s of a cold `fluxkit generate`).
        self.word_embeddings = _embedding(cfg["vocab_size"], h)
        self.position_embeddings = _embedding(cfg["max_position_embeddings"], h)
        self.token_type_embeddings = _embedding(cfg["type_vocab_size"], h)
        self.LayerNorm = nn.LayerNorm(h, eps=cfg["layer_norm_eps"])

    def forward(self, ids: Tensor) -> Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(pos) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class _SelfAttention(nn.Module):
    def __init__(self, h: int):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)


class _Intermediate(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.dense = nn.Linear(n_in, n_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))  # exact erf GELU, BERT's "gelu"


class _Output(nn.Module):
    """Projection, residual add, post-LayerNorm (dropout is off at inference)."""

    def __init__(self, n_in: int, n_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(n_in, n_out)
        self.LayerNorm = nn.LayerNorm(n_out, eps=eps)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        h = cfg["hidden_size"]
        self.self = _SelfAttention(h)
        self.output = _Output(h, h, cfg["layer_norm_eps"])


class _Layer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.heads = cfg["num_attention_heads"]
        self.attention = _Attention(cfg)
        self.intermediate = _Intermediate(cfg["hidden_size"], cfg["intermediate_size"])
        self.output = _Output(cfg["intermediate_size"], cfg["hidden_size"], cfg["layer_norm_eps"])

    def forward(self, x: Tensor, key_bias: Tensor) -> Tensor:
        b, n, h = x.shape
        a = self.attention.self

        def heads(t: Tensor) -> Tensor:
            return t.view(b, n, self.heads, h // self.heads).transpose(1, 2)

        ctx = F.scaled_dot_product_attention(heads(a.query(x)), heads(a.key(x)), heads(a.value(x)), attn_mask=key_bias)
        x = self.attention.output(ctx.transpose(1, 2).reshape(b, n, h), x)
        return self.output(self.intermediate(x), x)


class MiniLM(nn.Module):
    """BERT's encoder stack; `forward` returns the last hidden states [B, L, H] (what BertModel's
    `last_hidden_state` is), padding keys masked out."""

    def __init__(self, cfg: dict):
        super().__init__()
        if cfg.get("hidden_act", "gelu") != "gelu" or cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"MiniLM: unsupported BERT variant (hidden_act {cfg.get('hidden_act')!r}, "
                             f"position_embedding_type {cfg.get('position_embedding_type')!r})")
        self.config = cfg
        self.embeddings = _Embeddings(cfg)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(_Layer(cfg) for _ in range(cfg["num_hidden_layers"]))

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        x = self.embeddings(input_ids)
        # additive key mask, as BERT's extended attention mask: padded keys get the dtype's most negative value
        key_bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in self.encoder.layer:
            x = layer(x, key_bias)
        return x

    @classmethod
    def from_folder(cls, folder: Path, dtype: torch.dtype | None = None) -> MiniLM:
        from safetensors.torch import load_file

        cfg = json.loads((folder / "config.json").read_text())
        with torch.device("meta"):
            model = cls(cfg)
        state = {k: v for k, v in load_file(folder / "model.safetensors").items() if k not in UNUSED_KEYS}
        model.load_state_dict(state, strict=True, assign=True)
        return model.to(dtype=dtype) if dtype is not None else model


class WordPiece:
    """The folder's `tokenizer.json` (lower-casing WordPiece, [CLS] ... [SEP]) through the `tokenizers` library."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.pad_id = self.tokenizer.token_to_id("[PAD]")
        if self.pad_id is None:
            raise ValueError(f"{folder / 'tokenizer.json'}: no [PAD] token")

    def __call__(self, prompts: list[str], max_length: int) -> tuple[Tensor, Tensor, bool]:
        """(input_ids [B, max_length], attention_mask [B, max_length], whether any prompt was truncated)."""
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.enable_padding(length=max_length, pad_id=self.pad_id, pad_token="[PAD]")
        encodings = self.tokenizer.encode_batch(prompts)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return ids, mask, any(e.overflowing for e in encodings)
