"""Training configs: one TOML file per stage (`configs/tiny-*.toml`), read into frozen dataclasses.

A config names its stage, run, seed and model preset, then one table per concern:

    stage = "base"              # ae | cache | base | dev | schnell | fill | canny | kontext | regional
    name = "tiny-base"          # run folder under the runs dir
    seed = 0
    [model]   preset = "tiny-base"   (+ optional [model.flux] / [model.ae] field overrides: test-sized nets,
              `centered_ids = true` for image position ids counted from the image's middle)
    [data]    scenes: seed, n, sizes ([width, height] pairs, as fluxkit.data), kinds (the cache's scene mix),
              state and pin (curricula: attributes always stated, attributes fixed to one value)
    [optim]   AdamW and the LR schedule
    [train]   steps, batch size, EMA, bf16, checkpoint / sample / plot intervals
    [sample]  what the sample grids show
    [ae] | [cache] | [flow] | [distill] | [fill] | [canny] | [kontext] | [regional]   the stage's own options
              (only the table of its stage is allowed)

Every key is checked: an unknown key or a wrong type is a ValueError naming it. `--set train.steps=10` overrides.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from ..data.scenes import KINDS, OPTIONAL_ATTRIBUTES, check_pin
from ..params import ModelSpec, preset

STAGES = ("ae", "cache", "base", "dev", "schnell", "fill", "canny", "kontext", "regional")
STAGE_TABLE = {"ae": "ae", "cache": "cache", "base": "flow", "dev": "distill", "schnell": "distill", "fill": "fill",
               "canny": "canny", "kontext": "kontext", "regional": "regional"}
# Keys that may change between sessions of one run (`--resume`): lengthening it, intervals, speed options (compile
# and checkpointing change rounding, not the recipe) and the sample grids. Anything else must match the saved config.
RESUMABLE_CHANGES = {"train.steps", "train.checkpoint_every", "train.sample_every", "train.plot_every",
                     "train.keep_checkpoints", "train.compile", "train.gradient_checkpointing", "sample.size",
                     "sample.steps", "sample.guidance", "sample.seed", "sample.count"}


@dataclass(frozen=True)
class DataConfig:
    seed: int = 0
    n: int = 1_000_000  # scenes to draw from (the ae stage renders on the fly; cache encodes all n)
    sizes: tuple[tuple[int, int], ...] = ((128, 128), (160, 96), (96, 160))  # (width, height)
    kinds: tuple[str, ...] = KINDS  # scene kinds, drawn uniformly per scene: repeat one to weight it (cache stage)
    # Curricula (cache stage): optional attributes every caption states ("position", "size", "background") and
    # attributes pinned to one value or a list ({colour = "red", shape = ["square", "circle"], size = "large",
    # background = "white", position = ["left", "right", "top", "bottom"]}; position: single objects and signs,
    # whose board is centred on the cell; board = "black" or a list: a sign's board colour, letters as in BOARDS).
    state: tuple[str, ...] = ()
    pin: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.kinds or any(k not in KINDS for k in self.kinds):
            raise ValueError(f"data.kinds must be a non-empty list from {KINDS}, got {self.kinds!r}")
        if self.n < 1:
            raise ValueError(f"data.n must be >= 1, got {self.n}")
        if not set(self.state) <= OPTIONAL_ATTRIBUTES:
            raise ValueError(f"data.state: {sorted(set(self.state) - OPTIONAL_ATTRIBUTES)} cannot be stated "
                             f"optionally; choose from {sorted(OPTIONAL_ATTRIBUTES)}")
        if self.pin:
            try:
                check_pin(self.pin)
            except ValueError as e:
                raise ValueError(f"data.{e}") from None
        if not self.sizes or any(len(s) != 2 or s[0] % 16 or s[1] % 16 or min(s) <= 0 for s in self.sizes):
            raise ValueError(f"data.sizes must be [width, height] pairs of positive multiples of 16, got {self.sizes}")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.01  # on matrices only; biases, norms and embeddings' 1-D params are not decayed
    warmup_steps: int = 100
    schedule: str = "cosine"  # "cosine" (to min_lr_ratio * lr at the last step) or "constant" after warmup
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 disables

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_clip < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim: need lr > 0, warmup_steps >= 0, grad_clip >= 0, 0 <= min_lr_ratio <= 1; got "
                             f"{self.lr}, {self.warmup_steps}, {self.grad_clip}, {self.min_lr_ratio}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"optim.schedule must be 'cosine' or 'constant', got {self.schedule!r}")


@dataclass(frozen=True)
class LoopConfig:
    steps: int = 1000
    batch_size: int = 32  # per process (per rank under torchrun)
    ema_decay: float = 0.999
    # bf16 autocast (master weights, EMA and optimizer state stay fp32). "auto": on GPUs and on CPUs with native bf16
    # (AVX512-BF16/AMX); CPUs without it emulate bf16 ~100x slower than fp32 (AVX2-only EPYC: 0.8 vs 109 GFLOP/s).
    bf16: bool | str = "auto"
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the training forward/backward (fuses the many small elementwise ops)
    checkpoint_every: int = 250
    sample_every: int = 500  # 0: only at the end
    plot_every: int = 50
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "plot_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if isinstance(self.bf16, str) and self.bf16 != "auto":
            raise ValueError(f"train.bf16 must be true, false or \"auto\", got {self.bf16!r}")
        if self.sample_every < 0 or not 0 <= self.ema_decay < 1:
            raise ValueError(f"train: need sample_every >= 0 and 0 <= ema_decay < 1, got {self.sample_every}, "
                             f"{self.ema_decay}")


@dataclass(frozen=True)
class SampleConfig:
    size: tuple[int, int] = (128, 128)  # (width, height)
    steps: tuple[int, ...] = (28,)  # one grid row per entry (schnell: (1, 2, 4))
    guidance: float = 4.0  # base: true-CFG scale against the empty prompt; dev: the distilled guidance
    seed: int = 0
    count: int = 8  # prompts per row (the cache's sample prompts, cycled)


@dataclass(frozen=True)
class AEOptions:
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    edge_weight: float = 0.5  # L1 on finite differences: keeps letter strokes and shape edges sharp
    kl_weight: float = 1e-4  # on the mean KL per latent element: keeps latents near N(0, 1) without blurring
    # Scale equivariance (Skorokhodov et al. 2025, "Improving the Diffusability of Autoencoders"): the decoder must turn
    # the 2x average-pooled latent into the 2x average-pooled image (L1 + MSE, this weight). It keeps the latent's low
    # frequencies image-like, so an error spread over a token decodes to a blur, not to another colour or shape.
    scale_equivariance_weight: float = 0.0
    init: str = ""  # fine-tune: start from this ae run (name or path) or autoencoder .safetensors file
    crop: int = 0  # train on random crop x crop windows (0: whole images); the conv AE is ~4x cheaper on 64-px crops
    stats_scenes: int = 512  # scenes whose latents give shift_factor / scale_factor
    eval_scenes: int = 256  # held-out scenes (another seed, held-out pairs included) for the PSNR report
    eval_seed: int = 1_000_003


@dataclass(frozen=True)
class CacheOptions:
    ae: str = "tiny-ae"  # the ae run (a name under the runs dir, or a path)
    chunk_size: int = 1024  # scenes per chunk file; chunks are the cache's unit of resume
    encode_batch: int = 64
    prompts: tuple[str, ...] = (
        "a red circle above a blue square", "a sign that says 'OPEN'", "two yellow stars on a black background",
        "a small green triangle in the top left corner", "a large purple star", "three white circles on gray",
        "a blue square to the left of an orange triangle", "a sign that says 'CAFE'",
    )  # fixed sample-grid prompts, embedded once here so the transformer stages never load the text encoder


@dataclass(frozen=True)
class FlowOptions:
    cache: str | tuple[str, ...] = "tiny-cache"  # a cache run, or a list of them to train on their scenes together
    # (a data mix: each scene is drawn with equal chance, so list one twice to double its share)
    init: str = ""  # base: start from this run's EMA weights (or a model folder) instead of a fresh init, e.g. to
    # continue a finished base on another cache with its own LR schedule; "" = fresh adaLN-Zero init
    caption_dropout: float = 0.1  # empty-prompt rate: teaches the unconditional velocity classifier-free guidance needs
    logit_mean: float = 0.0  # t = time_shift(mu(L), sigmoid(N(logit_mean, logit_std)))
    logit_std: float = 1.0
    edge_weight: float = 0.0  # > 0: each token's squared error weighs 1 + edge_weight * (share of its pixels on a
    # region edge of the rendered scene), so outlines, which decide shape and take few pixels, count more; 0 = plain
    object_weight: float = 0.0  # > 0: adds object_weight * (share of the token's pixels inside an object or sign
    # board), so where objects go, which decides the position words' share of the loss, counts more; 0 = plain

    def __post_init__(self) -> None:
        if (not 0 <= self.caption_dropout < 1 or self.logit_std <= 0 or self.edge_weight < 0
                or self.object_weight < 0):
            raise ValueError(f"flow: need 0 <= caption_dropout < 1, logit_std > 0, edge_weight >= 0 and "
                             f"object_weight >= 0, got {self.caption_dropout}, {self.logit_std}, {self.edge_weight}, "
                             f"{self.object_weight}")
        if not isinstance(self.cache, str) and not self.cache:
            raise ValueError("flow.cache must name a cache run or a non-empty list of them, got []")


@dataclass(frozen=True)
class DistillOptions:
    teacher: str = "tiny-base"  # a finished run (name under the runs dir, or a path); its EMA weights teach
    cache: str | tuple[str, ...] = "tiny-cache"  # a cache run, or a data mix of several (as flow.cache)
    guidance_range: tuple[float, float] = (1.0, 7.0)  # dev: g ~ U[lo, hi]
    # dev: a guidance-distilled model folder or dev run whose guidance input starts the student's (e.g. when the
    # teacher is that model's base trained further); "" starts it silent
    guidance_init: str = ""
    guidance: float = 3.5  # schnell: the dev teacher's guidance along its trajectories
    trajectories: int = 2048  # schnell: teacher ODE solutions, noise -> image
    teacher_steps: int = 20  # schnell: shifted Euler steps of the teacher (the 4-step linear points are added)
    student_steps: tuple[int, ...] = (1, 2, 4)  # schnell: linear schedules whose jumps the student learns
    trajectory_batch: int = 64

    def __post_init__(self) -> None:
        lo, hi = self.guidance_range
        if not 0 <= lo <= hi or self.trajectories < 1 or self.teacher_steps < 1 or self.trajectory_batch < 1:
            raise ValueError(f"distill: bad guidance_range {self.guidance_range}, trajectories {self.trajectories}, "
                             f"teacher_steps {self.teacher_steps} or trajectory_batch {self.trajectory_batch}")
        if not isinstance(self.cache, str) and not self.cache:
            raise ValueError("distill.cache must name a cache run or a non-empty list of them, got []")
        if not self.student_steps or any(s not in (1, 2, 4) for s in self.student_steps):
            raise ValueError(f"distill.student_steps must be a non-empty subset of (1, 2, 4) (the points trajectories "
                             f"store), got {self.student_steps}")


@dataclass(frozen=True)
class VariantOptions:
    """What the conditioned-variant stages (fill, canny, kontext, regional; fluxkit.train.variants) share."""

    init: str = "tiny-dev"  # a finished transformer run (its EMA weights) or a fluxkit model folder to start from
    cache: str = "tiny-cache"  # the cache whose autoencoder the init model was trained on (it encodes every image)
    mode: str = "full"  # "full": train every weight, export a model folder; "lora": rank-r LoRA (+ widened img_in)
    rank: int = 16  # lora: adapter rank (capped at min(in, out) per module, as BFL's control LoRAs are)
    alpha: float = 16.0  # lora: scale alpha / rank
    lora_targets: tuple[str, ...] = ()  # lora: linear names or dotted suffixes; () = every linear, as BFL's
    guidance: float = 3.5  # the guidance value a guidance-distilled init model is fed while training
    caption_dropout: float = 0.1  # empty-prompt rate (keeps true CFG / the unconditioned velocity working)
    logit_mean: float = 0.0  # t = time_shift(mu(L), sigmoid(N(logit_mean, logit_std))), as the base stage
    logit_std: float = 1.0
    export_dtype: str = "bfloat16"  # of the exported model and LoRA file (as shipped); "float32" keeps them exact
    # lora: also train the attention's QK RMSNorm scales (shipped in the LoRA file as BFL's replacement norm scales).
    # After RMSNorm a logit q.k / sqrt(d) is at most max(s_q) max(s_k) sqrt(d): the scales bound how sharply a head can
    # attend to one position (the init's are ~1), e.g. a context token at its target's position.
    train_norms: bool = False
    norm_lr_mult: float = 1.0  # the QK norm scales' lr, as a multiple of optim.lr (full mode, or lora + train_norms)

    def __post_init__(self) -> None:
        if self.export_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"{self.table()}.export_dtype must be 'bfloat16' or 'float32', got {self.export_dtype!r}")
        if self.mode not in ("full", "lora"):
            raise ValueError(f"{self.table()}.mode must be 'full' or 'lora', got {self.mode!r}")
        if self.norm_lr_mult <= 0:
            raise ValueError(f"{self.table()}.norm_lr_mult must be positive, got {self.norm_lr_mult}")
        if self.rank < 1 or self.alpha <= 0 or self.guidance < 0:
            raise ValueError(f"{self.table()}: need rank >= 1, alpha > 0 and guidance >= 0, got {self.rank}, "
                             f"{self.alpha}, {self.guidance}")
        if not 0 <= self.caption_dropout < 1 or self.logit_std <= 0:
            raise ValueError(f"{self.table()}: need 0 <= caption_dropout < 1 and logit_std > 0, got "
                             f"{self.caption_dropout}, {self.logit_std}")

    @classmethod
    def table(cls) -> str:
        return cls.__name__.removesuffix("Options").lower()

    def _check_choices(self, name: str, allowed: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if not value or any(v not in allowed for v in value):
            raise ValueError(f"{self.table()}.{name} must be a non-empty list from {allowed}, got {value!r}")


@dataclass(frozen=True)
class FillOptions(VariantOptions):
    # Mask kinds, drawn uniformly per image (repeat one to weight it): an object's (or the sign's) box grown by
    # mask_margin, 1-3 random rectangles, or borders of 1-4 sides (outpainting).
    masks: tuple[str, ...] = ("object", "rectangles", "outpaint")
    mask_margin: float = 0.08  # fraction of the short image side

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_choices("masks", ("object", "rectangles", "outpaint"))
        if not 0 <= self.mask_margin < 0.5:
            raise ValueError(f"fill.mask_margin must be in [0, 0.5), got {self.mask_margin}")


@dataclass(frozen=True)
class CannyOptions(VariantOptions):
    # Edge maps, drawn per image: "scene" = the renderer's exact region boundaries, "canny" = fluxkit.control.canny
    # of the rendered image (what `--control canny` computes from a user's picture).
    edges: tuple[str, ...] = ("scene", "canny")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_choices("edges", ("scene", "canny"))


@dataclass(frozen=True)
class KontextOptions(VariantOptions):
    edits: tuple[str, ...] = ("recolor", "remove", "move")  # fluxkit.data edits, one drawn per pair

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_choices("edits", ("recolor", "remove", "move"))


@dataclass(frozen=True)
class RegionalOptions(VariantOptions):
    # fluxkit.data.regions layouts, one drawn per step (a batch shares its region count); "uneven" cuts at 35-65%.
    # caption_dropout empties the global prompt only (the region prompts alone then steer the picture).
    layouts: tuple[str, ...] = ("left/right", "top/bottom", "thirds", "rows", "uneven")

    def __post_init__(self) -> None:
        super().__post_init__()
        from ..data.regions import LAYOUTS

        self._check_choices("layouts", LAYOUTS)


@dataclass(frozen=True)
class TrainConfig:
    stage: str
    name: str
    seed: int = 0
    model: str = "tiny-base"  # preset name
    flux_overrides: dict = field(default_factory=dict)
    ae_overrides: dict = field(default_factory=dict)
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: LoopConfig = LoopConfig()
    sample: SampleConfig = SampleConfig()
    options: AEOptions | CacheOptions | FlowOptions | DistillOptions | VariantOptions | None = None

    def spec(self) -> ModelSpec:
        """The model preset with the config's [model.flux] / [model.ae] field overrides applied."""
        base = preset(self.model)
        flux = _override(base.flux, self.flux_overrides, "model.flux")
        ae = _override(base.ae, self.ae_overrides, "model.ae")
        return replace(base, flux=flux, ae=ae)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


OPTION_TYPES = {"ae": AEOptions, "cache": CacheOptions, "flow": FlowOptions, "distill": DistillOptions,
                "fill": FillOptions, "canny": CannyOptions, "kontext": KontextOptions, "regional": RegionalOptions}
SECTIONS = {"data": DataConfig, "optim": OptimConfig, "train": LoopConfig, "sample": SampleConfig}


def _override(params, table: dict, where: str):
    known = {f.name: f for f in fields(params)}
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ValueError(f"[{where}] has unknown keys {unknown}; known: {sorted(known)}")
    hints = typing.get_type_hints(type(params))
    return replace(params, **{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in table.items()})


def _coerce(value, tp, where: str):
    """A TOML value checked against a dataclass field type (int, float, bool, str, tuples of those, X | None)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for a in options[:-1]:  # the first member type the value fits
            try:
                return _coerce(value, a, where)
            except ValueError:
                pass
        return _coerce(value, options[-1], where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ValueError(f"{where} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is dict and isinstance(value, dict):
        return dict(value)
    if isinstance(value, bool) != (tp is bool) or not isinstance(value, tp):
        raise ValueError(f"{where} must be of type {tp.__name__}, got {value!r}")
    return value


def _section(cls, table, where: str):
    if not isinstance(table, dict):
        raise ValueError(f"[{where}] must be a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ValueError(f"[{where}] has unknown keys {unknown}; known: {sorted(known)}")
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in table.items()})


def parse_override(text: str) -> tuple[list[str], object]:
    """'train.steps=10' -> (['train', 'steps'], 10). The value is TOML; a bare word is taken as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set expects KEY=VALUE (e.g. train.steps=100), got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # e.g. --set name=tiny-base-2; the field's type check still applies
    return key.strip().split("."), value


def apply_overrides(table: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = table
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {text}: {part!r} is not a table")
        node[path[-1]] = value
    return table


def config_from_dict(table: dict, source: str = "config") -> TrainConfig:
    table = dict(table)
    stage = table.pop("stage", None)
    if stage not in STAGES:
        raise ValueError(f"{source}: stage must be one of {STAGES}, got {stage!r}")
    name = table.pop("name", None)
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ValueError(f"{source}: name must be a plain folder name, got {name!r}")
    seed = _coerce(table.pop("seed", 0), int, "seed")
    model = dict(table.pop("model", {}))
    preset_name = _coerce(model.pop("preset", "tiny-base"), str, "model.preset")
    flux, ae = dict(model.pop("flux", {})), dict(model.pop("ae", {}))
    if model:
        raise ValueError(f"{source}: [model] has unknown keys {sorted(model)}; known: preset, flux, ae")
    sections = {key: _section(cls, table.pop(key), key) for key, cls in SECTIONS.items() if key in table}
    own = STAGE_TABLE[stage]
    options = _section(OPTION_TYPES[own], table.pop(own, {}), own)
    if table:
        raise ValueError(f"{source}: keys/tables {sorted(table)} do not apply to stage {stage!r} "
                         f"(its own table is [{own}])")
    cfg = TrainConfig(stage, name, seed, preset_name, flux, ae, options=options, **sections)
    cfg.spec()  # validates the preset and the overrides now, not mid-run
    return cfg


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from None
    return config_from_dict(apply_overrides(table, list(overrides)), str(path))


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two `TrainConfig.to_dict()` results.

    Keys the saved config lacks are skipped: an option added to fluxkit after a run started must not block its
    `--resume` (the run continues with that option's value from the current config).
    """
    diffs = []
    for key in sorted(saved):
        a, b = saved[key], current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, f"{prefix}{key}.")
        elif _jsonable(a) != _jsonable(b):
            diffs.append(f"{prefix}{key}")
    return diffs


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (list, tuple)) else x
