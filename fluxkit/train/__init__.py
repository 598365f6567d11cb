"""Training the tiny Flux family: autoencoder -> latent cache -> base (rectified flow) -> dev (guidance
distillation) -> schnell (timestep distillation), then the FLUX.1 tools variants fine-tuned from dev: fill, canny,
kontext. One config file per stage (`configs/tiny-*.toml`)."""

from .config import TrainConfig, config_from_dict, load_config
from .stages import StageResult, run_stage

__all__ = ["StageResult", "TrainConfig", "config_from_dict", "load_config", "run_stage"]
