"""vtc.export: Hugging Face VLM checkpoint -> compressed, validated ONNX artifact (needs torch)."""

__version__ = "0.1.0"
