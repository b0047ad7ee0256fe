"""sailvl: SAIL-VL2-style vision-language models in plain PyTorch.

Public API: `SailVL` (the model, SAIL-VL2 checkpoint layout), `Processor` (tokenizer + image / video
preprocessing + chat template), `SailVLConfig`, `load` (a model directory ready for `.chat`), `__version__`.
"""

from .config import LLMConfig, SailVLConfig, VisionConfig
from .data.processor import Processor
from .model.vlm import SailVL
from .pipeline import load

__version__ = "0.1.0"
__all__ = ["SailVL", "Processor", "SailVLConfig", "VisionConfig", "LLMConfig", "load", "__version__"]
