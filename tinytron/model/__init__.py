from tinytron.model.config import ModelConfig
from tinytron.model.gpt import GPT

__all__ = ["GPT", "ModelConfig"]
