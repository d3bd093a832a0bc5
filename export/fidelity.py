"""Fidelity of a compressed artifact against the uncompressed one, from the runtime's own logits.

For each (image, prompt) pair, the reference is the ratio-1.0 artifact run by the runtime: its
first-token logits z_ref [V] and its greedy tokens r_1..r_T (T = 32, EOS ignored). The variant is
run teacher-forced on the reference tokens (prefill, then decode r_1, ..., r_{T-1}), giving logits
z_1..z_T, and scored by

    greedy_agreement      (1/T) * sum_t [argmax z_t == r_t]          (teacher-forced, per pair, then mean)
    greedy_prefix_tokens  tokens before the first disagreement        (= the free-running greedy prefix
                                                                        that matches the reference)
    first_token_kl        KL(softmax z_ref || softmax z_1) in nats, float64
    first_token_match     [argmax z_1 == r_1]

Both artifacts run on the same backend and threads; nothing here needs torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vtc.runtime.images import fidelity_images  # the sweep's default images

DEFAULT_PROMPTS = ("What shapes do you see in the picture?", "Describe the image in detail.")


@dataclass
class Reference:
    pairs: list  # [(PIL image, prompt)]
    tokens: list  # [P][T] greedy tokens of the uncompressed artifact
    first_logits: list  # [P] float64 [V]


def _prefill(vlm, image, prompt: str, n_tokens: int) -> np.ndarray:
    p = vlm.prepare_prompt(prompt)
    vlm.check_room(p, n_tokens)
    embeds, _kept, _map = vlm.encode_image(vlm.prepare_image(image))
    return np.array(vlm.prefill(p, embeds), dtype=np.float64)  # [V], copied out of the backend's buffer


def reference(vlm, pairs: list, n_tokens: int) -> Reference:
    tokens, first = [], []
    for image, prompt in pairs:
        logits = _prefill(vlm, image, prompt, n_tokens)
        first.append(logits)
        seq = [int(np.argmax(logits))]
        while len(seq) < n_tokens:
            seq.append(int(np.argmax(vlm.decode_step(seq[-1]))))
        tokens.append(seq)
    return Reference(pairs=pairs, tokens=tokens, first_logits=first)


def kl_nats(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """KL(softmax p || softmax q), float64."""
    lp = p_logits - p_logits.max()
    lp = lp - np.log(np.exp(lp).sum())
    lq = q_logits - q_logits.max()
    lq = lq - np.log(np.exp(lq).sum())
    return float(np.sum(np.exp(lp) * (lp - lq)))


def score(vlm, ref: Reference) -> dict:
    """The variant `vlm` against the reference (see the module docstring); means over the pairs."""
    agree, prefix, kls, first_match = [], [], [], []
    for (image, prompt), toks, z_ref in zip(ref.pairs, ref.tokens, ref.first_logits):
        logits = _prefill(vlm, image, prompt, len(toks))
        kls.append(kl_nats(z_ref, logits))
        hits = [int(np.argmax(logits)) == toks[0]]
        for t in range(1, len(toks)):
            hits.append(int(np.argmax(vlm.decode_step(toks[t - 1]))) == toks[t])
        agree.append(float(np.mean(hits)))
        prefix.append(hits.index(False) if False in hits else len(hits))
        first_match.append(float(hits[0]))
    return {"greedy_agreement": float(np.mean(agree)), "greedy_prefix_tokens": float(np.mean(prefix)),
            "first_token_kl": float(np.mean(kls)), "first_token_match": float(np.mean(first_match)),
            "fidelity_pairs": len(ref.pairs), "fidelity_tokens": len(ref.tokens[0])}


def load_pairs(images: list[str], prompts: list[str]) -> list:
    """images x prompts; defaults: the three synthetic images and DEFAULT_PROMPTS."""
    from vtc.runtime.preprocess import load_image

    imgs = [load_image(Path(p)) for p in images] if images else fidelity_images()
    return [(img, prompt) for img in imgs for prompt in (prompts or DEFAULT_PROMPTS)]
