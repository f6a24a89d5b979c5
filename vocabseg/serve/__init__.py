"""An HTTP API and a one-page web UI around a model: ``create_app(model)`` gives a FastAPI app, ``serve(...)`` runs it.

    from vocabseg.serve import create_app, serve
    app = create_app(vocabseg.load_model())      # mount it, test it with TestClient, or run it with uvicorn
    serve(host="127.0.0.1", port=8000)           # what ``vocabseg serve`` does

Needs the ``serve`` extra (fastapi, uvicorn, python-multipart). See docs/serving.md.
"""

from .app import (DEFAULT_MAX_PIXELS, DEFAULT_MAX_UPLOAD_BYTES, DEFAULT_MAX_VOCABULARY, create_app, label_png_bytes,
                  serve)

__all__ = ["create_app", "serve", "label_png_bytes", "DEFAULT_MAX_UPLOAD_BYTES", "DEFAULT_MAX_PIXELS",
           "DEFAULT_MAX_VOCABULARY"]
