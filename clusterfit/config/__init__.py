"""The experiment config: its schema (`schema`, `kubernetes`) and its loading (`loading`).

    from clusterfit.config import load_config
    cfg = load_config("quickstart", {"CLUSTERFIT.NUM_CLUSTERS": 30})

No deep-learning library is imported here: the controller image has none.
"""

from clusterfit.config.kubernetes import ControllerConfig, KubernetesConfig
from clusterfit.config.loading import ConfigError, config_from_args, load_config, to_yaml, validate
from clusterfit.config.schema import (
    LAYERS,
    PARTITIONS,
    STEPS,
    Config,
    DataSplitConfig,
    OptimizerConfig,
    S3Config,
    StorageConfig,
    TransformsConfig,
    WeightsInitConfig,
)

__all__ = [
    "LAYERS",
    "PARTITIONS",
    "STEPS",
    "Config",
    "ConfigError",
    "ControllerConfig",
    "DataSplitConfig",
    "KubernetesConfig",
    "OptimizerConfig",
    "S3Config",
    "StorageConfig",
    "TransformsConfig",
    "WeightsInitConfig",
    "config_from_args",
    "load_config",
    "to_yaml",
    "validate",
]
