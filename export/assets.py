"""The non-graph files of an artifact: tokenizer, chat template, preprocessing config, embedding table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from vtc.runtime.errors import ModelError
from vtc.runtime.text import find_chat_template

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def _eos_ids(src: Path, model) -> list[int]:
    """EOS ids as HF generate would use them: generation_config.json first, then the text config."""
    gen = src / "generation_config.json"
    eos = json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else None
    if eos is None:
        eos = getattr(model.generation_config, "eos_token_id", None) or model.config.text_config.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


def write(out: Path, src: Path, adapter, model) -> dict:
    """Copy/derive the side files into `out`; returns the manifest fields they fill."""
    src = Path(src)
    if not (src / "tokenizer.json").is_file():
        raise ModelError(f"{src} has no tokenizer.json (the fast-tokenizer file vtc's runtime reads).",
                         "Save the checkpoint's fast tokenizer: AutoTokenizer.from_pretrained(dir).save_pretrained(dir).")
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    template = find_chat_template(src)
    if template is not None:
        (out / "chat_template.jinja").write_text(template)
    preprocess = adapter.preprocessor(src).to_dict()  # the build's static image layout included
    # the same values in a listed, hashed file: the runtime checks the manifest's against it (artifact_check)
    (out / "preprocess.json").write_text(json.dumps(preprocess, indent=2) + "\n")
    weights = adapter.embed_table(model)  # [V, D], in the graph dtype (build --dtype)
    dtype = str(weights.dtype).removeprefix("torch.")
    # bfloat16 is stored as its raw 16 bits (.npy has no bfloat16); the runtime views it back (manifest dtype)
    table = weights.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else weights.numpy()
    np.save(out / "embed_tokens.npy", np.ascontiguousarray(table), allow_pickle=False)
    return {"chat_template": "chat_template.jinja" if template is not None else None,
            "eos_token_ids": _eos_ids(src, model), "preprocess": preprocess, "image_prompt": adapter.image_prompt(src),
            "embeddings": {"file": "embed_tokens.npy", "dtype": dtype, "shape": list(table.shape)}}
