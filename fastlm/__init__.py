"""fastlm: fused training kernels for small and mid-size language models.

``fastlm.ops`` holds the functional ops, ``fastlm.nn`` their drop-in modules, ``fastlm.backends`` the
choice of kernel backend (cpp, cuda, triton, torch), ``fastlm.models`` the makemore models (reference and
fused twins), and ``fastlm.convert(model)`` swaps a model's torch layers for the fused ones.
"""

from fastlm import backends, models, nn, ops
from fastlm.convert import convert

__version__ = "0.1.0"
__all__ = ["backends", "convert", "models", "nn", "ops"]
