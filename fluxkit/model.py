"""The FLUX.1 rectified-flow transformer. Module attribute names are the BFL checkpoint keys, so a checkpoint loads
with `load_state_dict(assign=True)` after meta-device construction, no renaming."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .layers import DoubleStreamBlock, EmbedND, LastLayer, MLPEmbedder, SingleStreamBlock
from .math import timestep_embedding
from .params import FluxParams
from .sampling import centre_image_ids
from .step_cache import FirstBlockCacheConfig, StepCache, TeaCacheConfig, run_blocks_cached


class Flux(nn.Module):
    """velocity = Flux(packed noisy latents, text states, sigma, pooled text vector[, guidance])."""

    def __init__(self, params: FluxParams):
        super().__init__()
        self.params = params
        hidden = params.hidden_size
        self.pe_embedder = EmbedND(theta=params.theta, axes_dim=params.axes_dim)
        self.img_in = nn.Linear(params.in_channels, hidden, bias=True)
        self.time_in = MLPEmbedder(in_dim=256, hidden_dim=hidden)
        self.vector_in = MLPEmbedder(params.vec_in_dim, hidden)
        self.guidance_in = MLPEmbedder(in_dim=256, hidden_dim=hidden) if params.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(params.context_in_dim, hidden)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(hidden, params.num_heads, params.mlp_ratio, params.qkv_bias) for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(hidden, params.num_heads, params.mlp_ratio) for _ in range(params.depth_single_blocks)
        )
        self.final_layer = LastLayer(hidden, params.out_channels)
        self.gradient_checkpointing = False
        self.step_cache: StepCache | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.img_in.weight.device

    def conditioning_vector(self, timesteps: Tensor, y: Tensor, guidance: Tensor | None) -> Tensor:
        """vec [B, hidden] = time_in(temb(t)) [+ guidance_in(temb(g))] + vector_in(y); feeds every adaLN."""
        dtype = self.dtype
        vec = self.time_in(timestep_embedding(timesteps.to(dtype), 256))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("this model is guidance-distilled (dev-like): a guidance value is required")
            vec = vec + self.guidance_in(timestep_embedding(guidance.to(dtype), 256))
        return vec + self.vector_in(y.to(dtype))

    def position_embedding(self, txt_ids: Tensor, img_ids: Tensor) -> Tensor:
        """RoPE cos/sin tables [2, B, 1, L_txt + L_img, head_dim] for the joint sequence [txt; img].

        Callers that run the model many times on the same ids compute this once and pass it as `pe`.
        """
        if self.params.centered_ids:
            img_ids = centre_image_ids(img_ids)
        return self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))

    def _run(self, block: nn.Module, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
        pe: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """img [B, L_img, in_ch], txt [B, L_txt, ctx], ids [B, L, 3], timesteps/guidance [B] -> [B, L_img, out_ch].

        `pe` may be passed precomputed (it depends only on the ids, which are fixed over a sampling run).
        """
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"img and txt must be [B, L, C]; got {tuple(img.shape)} and {tuple(txt.shape)}")
        dtype = self.dtype
        img = self.img_in(img.to(dtype))  # [B, L_img, hidden]
        txt = self.txt_in(txt.to(dtype))  # [B, L_txt, hidden]
        vec = self.conditioning_vector(timesteps, y, guidance)  # [B, hidden]
        if pe is None:
            pe = self.position_embedding(txt_ids, img_ids)

        if self.step_cache is not None:
            img = run_blocks_cached(self, self.step_cache, img, txt, vec, pe, attn_mask)
        else:
            img = self.run_blocks(img, txt, vec, pe, attn_mask)
        return self.final_layer(img, vec)  # [B, L_img, out_ch]

    def run_blocks(
        self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor, attn_mask: Tensor | None = None, double_blocks=None
    ) -> Tensor:
        """Double blocks (separate streams), then single blocks over [txt; img]; returns the image tokens."""
        for block in self.double_blocks if double_blocks is None else double_blocks:
            img, txt = self._run(block, img, txt, vec, pe, attn_mask)
        x = torch.cat((txt, img), dim=1)  # [B, L_txt + L_img, hidden]
        for block in self.single_blocks:
            x = self._run(block, x, vec, pe, attn_mask)
        return x[:, txt.shape[1] :]

    def compile_repeated_blocks(self, **compile_kwargs) -> None:
        """torch.compile each double and single block in place (regional compilation, diffusers' name for it).

        The blocks of one kind share code, so Dynamo compiles each kind once per input shape and reuses the graph for
        the other 18 / 37; the first call pays the compilation (about half a minute per kind on a 2-core CPU) and
        later calls run with the elementwise ops around the matmuls fused. Keyword arguments go to `torch.compile`.
        """
        for block in (*self.double_blocks, *self.single_blocks):
            block.compile(**compile_kwargs)

    def enable_cache(self, config: FirstBlockCacheConfig | TeaCacheConfig) -> StepCache:
        """Skip most of the network on steps where it would change little (see fluxkit.step_cache)."""
        self.step_cache = StepCache(config)
        return self.step_cache

    def disable_cache(self) -> None:
        self.step_cache = None
