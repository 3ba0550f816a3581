"""The diffusers model families behind --teacher flux | wan | sd3 | flux2 (see common/backends/base.py)."""
from common.backends.base import DiffusersBackend
from common.backends.flux import FluxBackend
from common.backends.flux2 import Flux2Backend
from common.backends.sd3 import SD3Backend
from common.backends.wan import TwoExperts, WanBackend

__all__ = ["DiffusersBackend", "FluxBackend", "WanBackend", "SD3Backend", "Flux2Backend", "TwoExperts"]
