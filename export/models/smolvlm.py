"""SmolVLM (HF `SmolVLMForConditionalGeneration`): Idefics3's architecture under its own model_type; the
adapter lives with Idefics3's (vtc.export.models.idefics3)."""

from __future__ import annotations

from vtc.export.models.idefics3 import SmolVLMAdapter

ADAPTER = SmolVLMAdapter()
