"""fastlm: fused training kernels for small and mid-size language models.

``fastlm.ops`` holds the functional ops, ``fastlm.nn`` their drop-in modules, ``fastlm.backends`` the
choice of kernel backend (cpp, cuda, triton, torch).
"""

from fastlm import backends, nn, ops

__version__ = "0.1.0"
__all__ = ["backends", "nn", "ops"]
