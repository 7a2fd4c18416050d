"""Moved to disttrain.secrets. Kept only for run.py's import until that file switches to
`from disttrain.secrets import mask_output, secret_values`; then delete this module."""

from disttrain.secrets import mask_output, secret_values

__all__ = ["mask_output", "secret_values"]
