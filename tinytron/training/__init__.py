from tinytron.training.config import Config, ConfigError
from tinytron.training.launch import run
from tinytron.training.trainer import Trainer

__all__ = ["Config", "ConfigError", "Trainer", "run"]
