"""Exporting models for other runtimes. ``vocabseg.export.onnx``: image model with the vocabulary as an input,
text encoder, and an onnxruntime segmenter (see docs/export.md).

Importing this package does not import onnx or onnxruntime; they are needed only when a function runs.
"""

from .onnx import (
    CONFIG_NAME,
    IMAGE_FILE,
    TEXT_FILE,
    OnnxSegmenter,
    OnnxTextEncoder,
    PreprocessConfig,
    export_command,
    export_image_model,
    export_text_encoder,
    load_onnx_segmenter,
    preprocess,
)

__all__ = [
    "CONFIG_NAME",
    "IMAGE_FILE",
    "TEXT_FILE",
    "OnnxSegmenter",
    "OnnxTextEncoder",
    "PreprocessConfig",
    "export_command",
    "export_image_model",
    "export_text_encoder",
    "load_onnx_segmenter",
    "preprocess",
]
