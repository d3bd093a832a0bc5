"""Architecture registry: one small module per VLM family, imported only when needed.

`resolve(checkpoint_dir)` reads `config.json`, finds the adapter for its `model_type`, and fails with
the list of supported architectures otherwise (llama.cpp's convert registry does the same).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from vtc.runtime.errors import ModelError

# model_type (config.json) -> module under vtc.export.models that defines `ADAPTER`.
_REGISTRY: dict[str, str] = {
    "llava": "llava",
    "idefics3": "idefics3",
    "smolvlm": "smolvlm",
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen2_vl": "qwen2_vl",
}

# Shown by `vtc-export list`, and in the error for an unsupported checkpoint.
PLANNED: dict[str, str] = {}


def supported() -> dict[str, str]:
    """model_type -> human name of every registered architecture."""
    return {mt: importlib.import_module(f"{__name__}.{mod}").ADAPTER.display_name for mt, mod in _REGISTRY.items()}


def read_config(checkpoint_dir: Path) -> dict:
    """config.json of a checkpoint directory, with errors that say what is wrong and what to do."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.exists():
        raise ModelError(f"model directory {checkpoint_dir} does not exist.",
                         "Pass --model with a local Hugging Face checkpoint directory (config.json + *.safetensors).")
    if not checkpoint_dir.is_dir():
        raise ModelError(f"--model {checkpoint_dir} is a file, not a directory.",
                         "Pass the checkpoint directory that contains config.json.")
    cfg_path = checkpoint_dir / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{checkpoint_dir} is not a Hugging Face checkpoint: it has no config.json.",
                         "Pass the directory that `save_pretrained` wrote (config.json, *.safetensors, tokenizer).")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{cfg_path} is not valid JSON ({e}).", "Re-download or re-save the checkpoint.") from e
    except RecursionError as e:
        raise ModelError(f"{cfg_path} is nested too deeply to be a model config.",
                         "Re-download or re-save the checkpoint.") from e
    except OSError as e:
        raise ModelError(f"cannot read {cfg_path} ({e.strerror or e}).", "Check its permissions.") from e
    if not isinstance(cfg, dict):
        raise ModelError(f"{cfg_path} is a JSON {type(cfg).__name__}, not an object, so it is not a model config.",
                         "Re-download or re-save the checkpoint.")
    return cfg


def require_files(checkpoint_dir: Path) -> None:
    """The files a build reads besides config.json and the weights, checked before the model loads: the
    fast tokenizer (tokenizer.json, which the runtime reads) and a supported image processor config."""
    from vtc.runtime.preprocess import ImagePreprocessor

    if not (Path(checkpoint_dir) / "tokenizer.json").is_file():
        raise ModelError(f"{checkpoint_dir} has no tokenizer.json (the fast-tokenizer file vtc's runtime reads).",
                         "Save the checkpoint's fast tokenizer: AutoTokenizer.from_pretrained(dir).save_pretrained(dir).")
    ImagePreprocessor.from_dir(checkpoint_dir)  # missing, unparsable or unsupported: a ModelError


def resolve(checkpoint_dir: Path):
    """The adapter for this checkpoint's architecture."""
    cfg = read_config(checkpoint_dir)
    model_type = cfg.get("model_type")
    if isinstance(model_type, str) and model_type in _REGISTRY:
        adapter = importlib.import_module(f"{__name__}.{_REGISTRY[model_type]}").ADAPTER
        require_files(checkpoint_dir)
        return adapter
    listed = ", ".join(f"{mt} ({name})" for mt, name in supported().items())
    if "vision_config" not in cfg and "text_config" not in cfg:
        raise ModelError(f"{checkpoint_dir} is not a vision-language checkpoint (model_type={model_type!r}, "
                         "no vision_config).", f"vtc exports VLMs; supported architectures: {listed}.")
    raise ModelError(f"unsupported architecture model_type={model_type!r} in {checkpoint_dir}/config.json.",
                     f"Supported: {listed}." + (f" Planned: {', '.join(PLANNED.values())}." if PLANNED else ""))
