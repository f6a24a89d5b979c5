"""CLIP for dense prediction: model, weight loading, tokenizer, preprocessing and cached vocabulary embeddings.

    import vocabseg.clip as vc
    model = vc.load("ViT-B-16.pt", trust_jit=True)      # or a state dict / safetensors file
    image = vc.preprocess("cat.jpg", model=model)[None]  # [1, 3, R, R]
    text = vc.encode_vocabulary(model, "cat, dog")       # [2, D], cached
"""

from .model import CLIP, CLIPConfig, OPENAI_MEAN, OPENAI_STD, build_clip, config_for
from .load import clip_config_from_state_dict, load, read_state_dict, save_state_dict, weights_id
from .transforms import normalize, preprocess
from .vocabulary import (
    TEMPLATE_SETS,
    TextEmbeddingCache,
    default_cache,
    encode_vocabulary,
    parse_vocabulary,
)

__all__ = [
    "CLIP",
    "CLIPConfig",
    "OPENAI_MEAN",
    "OPENAI_STD",
    "build_clip",
    "config_for",
    "clip_config_from_state_dict",
    "load",
    "read_state_dict",
    "save_state_dict",
    "weights_id",
    "tokenize",
    "normalize",
    "preprocess",
    "TEMPLATE_SETS",
    "TextEmbeddingCache",
    "default_cache",
    "encode_vocabulary",
    "parse_vocabulary",
]


def __getattr__(name: str):
    """``tokenize`` on first use: its ftfy/regex imports are not needed when every vocabulary is cached."""
    if name == "tokenize":
        from .tokenizer import tokenize

        return tokenize
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
