"""tinylm: build, train, evaluate, fine-tune and sample small language models."""

from tinylm.checkpoint import LoadedRun, load_run
from tinylm.config import PRESETS, ModelConfig, SampleConfig, TrainConfig, build_configs
from tinylm.data import RandomWindows, SlidingWindowDataset, TokenData, prepare
from tinylm.errors import TinyLMError
from tinylm.evaluate import EvalResult, evaluate_tokens
from tinylm.generate import generate, stream
from tinylm.model import Transformer, parameter_summary
from tinylm.tokenizer import CharTokenizer, HFTokenizer, Tokenizer, load_tokenizer
from tinylm.train import Trainer, TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "ModelConfig",
    "TrainConfig",
    "SampleConfig",
    "build_configs",
    "Tokenizer",
    "CharTokenizer",
    "HFTokenizer",
    "load_tokenizer",
    "prepare",
    "TokenData",
    "RandomWindows",
    "SlidingWindowDataset",
    "Transformer",
    "parameter_summary",
    "train",
    "Trainer",
    "TrainResult",
    "load_run",
    "LoadedRun",
    "generate",
    "stream",
    "evaluate_tokens",
    "EvalResult",
    "TinyLMError",
]
