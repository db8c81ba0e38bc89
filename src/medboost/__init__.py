"""medboost: frozen transformer blocks from pre-trained language models as encoder layers for medical imaging."""

from medboost.errors import BlockLoadError, ConfigError, DataError, MedboostError, TrainingError

__version__ = "0.1.0"

__all__ = ["BlockLoadError", "ConfigError", "DataError", "MedboostError", "TrainingError", "__version__"]
