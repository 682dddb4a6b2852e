"""Typed configuration: dataclass schemas, YAML + dotted overrides (OmegaConf), validation."""

from lcot_mega.config.loader import ConfigError, config_from_dict, config_to_dict, load_config, save_config
from lcot_mega.config.schema import (
    ActorConfig,
    AlgoConfig,
    Config,
    DataConfig,
    DynamicSamplingConfig,
    InjectionConfig,
    LoggingConfig,
    ModelConfig,
    OverlongConfig,
    RelativeLengthConfig,
    RepetitionConfig,
    RewardConfig,
    RolloutConfig,
    TrainerConfig,
)

__all__ = [
    "ActorConfig",
    "AlgoConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DynamicSamplingConfig",
    "InjectionConfig",
    "LoggingConfig",
    "ModelConfig",
    "OverlongConfig",
    "RelativeLengthConfig",
    "RepetitionConfig",
    "RewardConfig",
    "RolloutConfig",
    "TrainerConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "save_config",
]
