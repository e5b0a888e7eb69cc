"""FastAPI gateway for GLIPv2 detection (torch-free: numpy, tokenizers, pillow, onnxruntime).

`create_app(settings)` in service.app builds the application; `python -m service` serves it.
"""
