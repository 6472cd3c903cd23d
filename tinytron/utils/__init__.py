from tinytron.utils.params import count_parameters

__all__ = ["count_parameters"]
