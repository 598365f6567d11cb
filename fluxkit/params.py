"""Typed hyper-parameters for every network, and a named preset registry.

Sizes live here and nowhere else: modules read them from these dataclasses. Variants are derived with
`dataclasses.replace` (e.g. a Fill model is flux-dev with `in_channels=384`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class FluxParams:
    """The transformer (BFL `FluxParams`). Defaults are FLUX.1-dev."""

    in_channels: int = 64  # 16 latent channels x 2x2 patch; Fill 384, Canny/Depth 128
    out_channels: int = 64
    vec_in_dim: int = 768  # pooled text vector (CLIP-L pooler_output)
    context_in_dim: int = 4096  # text token width (T5-XXL)
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19  # double-stream blocks
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)  # RoPE dims per position axis; sums to head_dim
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True  # dev: True, schnell: False
    # fluxkit's own models only: image position ids measured from the image's centre rather than its top-left corner,
    # so that the caption (at position 0) sits in the middle of every image size. BFL's FLUX.1 counts from the corner.
    centered_ids: bool = False

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(
                f"axes_dim {self.axes_dim} sums to {sum(self.axes_dim)}, expected head_dim {self.head_dim}"
            )
        if any(d % 2 for d in self.axes_dim):
            raise ValueError(f"every axes_dim entry must be even (RoPE rotates pairs), got {self.axes_dim}")
        if self.in_channels % 4 or self.out_channels % 4:
            raise ValueError(
                f"in/out channels must be multiples of 4 (2x2 packing), got {self.in_channels}/{self.out_channels}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def latent_channels(self) -> int:
        """Channels of the unpacked latent the model predicts (16 for every FLUX.1 variant)."""
        return self.out_channels // 4


@dataclass(frozen=True)
class AutoEncoderParams:
    """The 8x, 16-channel autoencoder (BFL `AutoEncoderParams`). Defaults are FLUX.1's `ae.safetensors`."""

    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    norm_groups: int = 32

    def __post_init__(self) -> None:
        for mult in self.ch_mult:
            if (self.ch * mult) % self.norm_groups:
                raise ValueError(f"channel count {self.ch * mult} is not divisible by norm_groups {self.norm_groups}")

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class ModelSpec:
    """A named model: its networks, the text encoder it expects and its sampling defaults."""

    name: str
    flux: FluxParams
    ae: AutoEncoderParams = field(default_factory=AutoEncoderParams)
    text_encoder: str = "t5-clip"  # key into fluxkit.text.ENCODERS
    max_sequence_length: int = 512
    shift_schedule: bool = True  # resolution-dependent shift (dev); schnell samples unshifted
    default_steps: int = 28
    default_guidance: float = 3.5
    default_size: tuple[int, int] = (1024, 1024)  # (height, width)


FLUX_DEV = FluxParams()
FLUX_SCHNELL = replace(FLUX_DEV, guidance_embed=False)

# The tiny family trained in this repo: the real architecture, scaled down (~13.5M parameters, so two transformers and
# the autoencoder ship in < 64 MB at bf16). The text side is MiniLM-L6 (384 wide); captions fit in 32 tokens.
TINY_FLUX = FluxParams(
    vec_in_dim=384,
    context_in_dim=384,
    hidden_size=256,
    num_heads=4,
    depth=3,
    depth_single_blocks=6,
    axes_dim=(8, 28, 28),
)
TINY_AE = AutoEncoderParams(
    ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=1, norm_groups=8, scale_factor=1.0, shift_factor=0.0
)

# Test-sized networks: every unit and parity test runs on these in seconds.
TEST_FLUX = FluxParams(
    in_channels=64,
    vec_in_dim=32,
    context_in_dim=48,
    hidden_size=32,
    num_heads=2,
    depth=1,
    depth_single_blocks=1,
    axes_dim=(4, 6, 6),
)
TEST_AE = AutoEncoderParams(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8)

PRESETS: dict[str, ModelSpec] = {
    "flux-dev": ModelSpec("flux-dev", FLUX_DEV),
    "flux-schnell": ModelSpec(
        "flux-schnell",
        FLUX_SCHNELL,
        max_sequence_length=256,
        shift_schedule=False,
        default_steps=4,
        default_guidance=0.0,
    ),
    "flux-fill-dev": ModelSpec(
        "flux-fill-dev", replace(FLUX_DEV, in_channels=384), default_steps=50, default_guidance=30.0
    ),
    "flux-canny-dev": ModelSpec(
        "flux-canny-dev", replace(FLUX_DEV, in_channels=128), default_steps=50, default_guidance=30.0
    ),
    "flux-depth-dev": ModelSpec(
        "flux-depth-dev", replace(FLUX_DEV, in_channels=128), default_steps=50, default_guidance=10.0
    ),
    "flux-kontext-dev": ModelSpec("flux-kontext-dev", FLUX_DEV, default_steps=28, default_guidance=2.5),
    "tiny-base": ModelSpec(
        "tiny-base",
        replace(TINY_FLUX, guidance_embed=False),
        TINY_AE,
        "minilm",
        max_sequence_length=32,
        default_steps=28,
        default_guidance=0.0,
        default_size=(128, 128),
    ),
    "tiny-dev": ModelSpec(
        "tiny-dev",
        TINY_FLUX,
        TINY_AE,
        "minilm",
        max_sequence_length=32,
        default_steps=20,
        default_guidance=3.5,
        default_size=(128, 128),
    ),
    "tiny-schnell": ModelSpec(
        "tiny-schnell",
        replace(TINY_FLUX, guidance_embed=False),
        TINY_AE,
        "minilm",
        max_sequence_length=32,
        shift_schedule=False,
        default_steps=4,
        default_guidance=0.0,
        default_size=(128, 128),
    ),
    "test-dev": ModelSpec("test-dev", TEST_FLUX, TEST_AE, "test", max_sequence_length=16, default_size=(32, 32)),
    "test-schnell": ModelSpec(
        "test-schnell",
        replace(TEST_FLUX, guidance_embed=False),
        TEST_AE,
        "test",
        max_sequence_length=16,
        shift_schedule=False,
        default_steps=4,
        default_guidance=0.0,
        default_size=(32, 32),
    ),
}


def preset(name: str) -> ModelSpec:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None
