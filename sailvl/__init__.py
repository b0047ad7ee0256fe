"""sailvl: SAIL-VL2-style vision-language models in plain PyTorch.

Public API: `SailVL` (the model, SAIL-VL2 checkpoint layout), `SailVLConfig`, `load` (a model directory
ready for `.chat`), `__version__`.
"""

from .config import LLMConfig, SailVLConfig, VisionConfig
from .model.vlm import SailVL
from .pipeline import load

__version__ = "0.1.0"
__all__ = ["SailVL", "SailVLConfig", "VisionConfig", "LLMConfig", "load", "__version__"]
