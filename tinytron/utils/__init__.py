from tinytron.utils.model import count_parameters

__all__ = ["count_parameters"]
