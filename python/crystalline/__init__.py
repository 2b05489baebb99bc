"""Crystalline: train small GPT-2 language models on your own text or code,
on the CPU, using every core.

The numeric work lives in the Rust extension `crystalline._core`; this
package holds configs, tokenization, the command line and checkpoint files.
"""

from crystalline._core import Model
from crystalline.config import ModelConfig, TrainConfig
from crystalline.inference import LoadedModel, load
from crystalline.train import Run, Trainer, resume, train

__all__ = ["LoadedModel", "Model", "ModelConfig", "Run", "TrainConfig", "Trainer", "load", "resume", "train"]
__version__ = "0.1.0"
