"""Quiet-STaR training over a stock Hugging Face Mistral-style decoder (DESIGN.md sections 3-6)."""
from .config import Config, LossConfig, ModelConfig, ThoughtConfig, TrainConfig
from .model import MixingHead, QuietStarModel, build_decoder
from .thoughts import Backends, quietstar_forward, sample_thoughts, thought_predictions

__all__ = ["Config", "LossConfig", "ModelConfig", "ThoughtConfig", "TrainConfig", "MixingHead", "QuietStarModel",
           "build_decoder", "Backends", "quietstar_forward", "sample_thoughts", "thought_predictions"]
