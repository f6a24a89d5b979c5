"""vocabseg: open-vocabulary image segmentation on a frozen CLIP.

    import vocabseg
    model = vocabseg.load_model()                      # the embedded default (or a name + checkpoint=...)
    result = model.predict("photo.jpg", vocabulary=["cat", "grass", "sky"])
    result.labels, result.logits, result.overlay()
"""

__version__ = "0.1.0"

from .errors import UserError  # noqa: E402
from .models import create_model, get_config, list_models, load_model  # noqa: E402
from .predict import Predictor, Segmentation  # noqa: E402

__all__ = ["load_model", "list_models", "create_model", "get_config", "Predictor", "Segmentation", "UserError"]
