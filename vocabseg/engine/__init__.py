"""Training and evaluation engine: ``train(config)``, ``load_config(path, overrides)``, ``evaluate(model, dataset)``.

Only ``cli`` imports this package; it uses ``models``, ``data``, ``losses`` and ``metrics``. See docs/training.md.
"""

from .config import TrainConfig, load_config, save_config
from .evaluate import evaluate, write_metrics_json
from .trainer import train

__all__ = ["TrainConfig", "load_config", "save_config", "train", "evaluate", "write_metrics_json"]
