"""Qwen2-VL (HF `Qwen2VLForConditionalGeneration`): Qwen2.5-VL's design without windowed attention; the adapter
lives with Qwen2.5-VL's (vtc.export.models.qwen2_5_vl)."""

from __future__ import annotations

from vtc.export.models.qwen2_5_vl import Qwen2VLAdapter

ADAPTER = Qwen2VLAdapter()
