"""Export: checkpoint -> ONNX graphs -> (TensorRT engines) -> Triton model repository."""
