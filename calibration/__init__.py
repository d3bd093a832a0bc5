"""vtc.calibration: KV-cache quantization scales (INT8/FP8) from a calibration set.

Not implemented yet: quantized KV caches arrive with the KV-quantization work; until then no command
offers them, and `vtc-export build` exports float32 caches only.
"""
