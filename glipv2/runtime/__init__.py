"""The torch-free contract between export and serving.

- manifest.py: manifest.json as a frozen dataclass (Manifest.load / dump, the format version)
- graphs.py:   the exported graphs' names, dtypes and dims, and where their files live
- onnx.py:     the ONNX Runtime engine (imports onnxruntime: not imported here)
- batch.py:    the ONE batch assembly + postprocessing (BatchRunner) that the gateway's
               backends, evaluation and the export parity checks run
- pipeline.py: images + prompts / questions -> letterbox, tokenize, BatchRunner

Imports run one way: service -> runtime -> core (glipv2.text, boxes, image, postprocess,
captioning, understanding); export -> runtime. Nothing here imports torch.
"""
