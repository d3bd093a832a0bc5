"""vtc.calibration: static KV-cache quantization scales (INT8, FP8) from a calibration set.

Workflow
    vtc-export calibrate [--model DIR] --method M --ratio R [--calib-images DIR --calib-prompts FILE.jsonl]
        -> kv_scales.json
    vtc-export build --kv-cache int8|fp8 [--kv-scales kv_scales.json]   (no file: build calibrates first)

What is measured: every calibration pair (image, prompt) runs through the PyTorch model WITH the
chosen compression (the project's eager path, vtc.export.reference.eager_generate), prefill plus
`new_tokens` greedy decode steps, and the K (post-RoPE) and V that the runtime's cache would hold are
collected per layer, per KV head, per channel.

Formula
    threshold[l, h, d] = absmax over tokens of |x[l, h, t, d]|       (statistic "absmax")
                       or the p-th percentile of |x|                 (statistic "percentile:P")
    granularity "head": threshold[l, h, :] = max over d (one scale per head)
    scale = threshold / qmax,   qmax = 127 (int8), 448 (float8 e4m3)
    stored:  q = clamp(round(x / scale), -127, 127)  (int8)   or  clamp(x / scale, -448, 448) -> e4m3
    A layer whose relative error ||x - q*scale|| / ||x|| (K or V, on the calibration data) exceeds the
    fallback threshold stays float16, and the build reports it.

kv_scales.json (schema "vtc.kv_scales", version 1; thresholds, not scales, so one file serves int8 and fp8)
    {"schema": "vtc.kv_scales", "version": 1,
     "model": {"architecture", "source", "num_layers", "num_kv_heads", "head_dim"},
     "compression": {"method", "ratio", "k_visual", "options"},
     "statistic": "absmax" | "percentile:P", "granularity": "channel" | "head",
     "calibration": {"set", "pairs", "new_tokens"},
     "layers": [{"k": [[Dh floats] x Hkv], "v": [[Dh floats] x Hkv]}, ... L]}
"""
