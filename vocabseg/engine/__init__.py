"""Training and evaluation engine: ``train(config)``, ``load_config(path, overrides)``, ``evaluate(model, dataset)``;
any family: ``run_family(load_family(path, overrides))`` (what ``vocabseg train`` does).

Only ``cli`` imports this package; it uses ``models``, ``data``, ``losses`` and ``metrics``. See docs/training.md.
"""

from .config import TrainConfig, load_config, load_family, save_config
from .evaluate import evaluate, write_metrics_json
from .loop import run_family
from .trainer import train

__all__ = ["TrainConfig", "load_config", "load_family", "save_config", "train", "run_family", "evaluate",
           "write_metrics_json"]
