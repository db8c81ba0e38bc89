"""Plain ``nn.Module`` models: the ViT, the LLM booster, classifiers, baselines, the registry and save/load."""

from medboost.models.booster import RESIDUAL_MODES, BoosterConfig, LLMBooster
from medboost.models.classifier import ViTClassifier, resnet
from medboost.models.hub import load_pretrained, save_pretrained
from medboost.models.registry import create_model, list_models, register_model
from medboost.models.vit import ViT

__all__ = [
    "RESIDUAL_MODES",
    "BoosterConfig",
    "LLMBooster",
    "ViT",
    "ViTClassifier",
    "create_model",
    "list_models",
    "load_pretrained",
    "register_model",
    "resnet",
    "save_pretrained",
]
