from tinytron.training.config import Config, ConfigError
from tinytron.training.trainer import Trainer, run

__all__ = ["Config", "ConfigError", "Trainer", "run"]
