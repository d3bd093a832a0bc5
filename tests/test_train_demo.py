"""tools/train_demo.py's data path, checked without training: packed turns are exactly single-question prompts.

Training packs one image and six questions into one sequence; if a turn could see another turn, or its
positions differed from inference's, the model would learn something inference never shows it.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest

from vtc.export.demo import demo_dir
from vtc.runtime import synthetic_vqa as sv

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def td():
    spec = importlib.util.spec_from_file_location("train_demo", REPO / "tools" / "train_demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def enc(td):
    return td.Encoder(demo_dir() / "tokenizer.json", (td.IMAGE_SIZE // td.PATCH) ** 2)


def test_block_mask_keeps_turns_apart(td):
    import torch

    turn = torch.tensor([[-1, -1, 0, 0, 1, 1, -2]])  # prefix, turn 0, turn 1, padding
    valid = torch.tensor([[1, 1, 1, 1, 1, 1, 0]])
    m = td.block_mask(turn, valid)[0, 0]
    assert m[5].tolist() == [True, True, False, False, True, True, False]  # turn 1 sees the prefix + itself
    assert m[3].tolist() == [True, True, True, True, False, False, False]
    assert m[1].tolist() == [True, True, False, False, False, False, False]  # causal prefix
    assert m[6].tolist() == [False] * 6 + [True]  # padding: only itself, never an empty softmax row


def test_packed_turns_share_the_image_prefix_and_restart_positions(td, enc):
    turns = [("what color is the circle?", "red"), ("where is the star?", "bottom right")]
    ids, labels, pos, turn, at = enc.packed(turns)
    n = enc.n_image + 3  # <s> USER : + image tokens
    assert ids[:n] == enc.first_turn(turns[0][0])[:n]
    for k, (q, a) in enumerate(turns):
        idx = [i for i, g in enumerate(turn) if g == k]
        single = enc.first_turn(q) + enc.ids(a) + [td.EOS_ID]
        assert [ids[i] for i in idx] == single[n:]
        assert [pos[i] for i in idx] == list(range(n, len(single)))
        assert [labels[i] for i in idx if labels[i] != -100] == enc.ids(a) + [td.EOS_ID]
        assert [ids[i + 1] for i in at[k]] == enc.ids(a)  # the positions that predict the answer words


def test_packed_logits_equal_single_question_logits(td, enc):
    import torch
    from transformers import LlavaForConditionalGeneration
    from vtc.runtime.preprocess import ImagePreprocessor

    model = LlavaForConditionalGeneration.from_pretrained(demo_dir()).eval()
    pre = ImagePreprocessor.from_dir(demo_dir())
    pixels, ids, mask, positions, labels, aux, answer_at, refs = td.scene_batch(random.Random(5), 2, pre, enc)
    assert mask.shape == (2, 1, ids.shape[1], ids.shape[1])
    with torch.inference_mode():
        feats = model.model.get_image_features(pixel_values=pixels, vision_feature_layer=-1,
                                               vision_feature_select_strategy="default").pooler_output
        feats = torch.stack(list(feats))
        embeds = model.get_input_embeddings()(ids).masked_scatter((ids == td.IMAGE_TOKEN_ID)[..., None],
                                                                  feats.reshape(-1, feats.shape[-1]))
        packed = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
        rng = random.Random(5)  # replay scene_batch's draws
        for i in range(2):
            objs = sv.scene(rng)
            turns = [sv.question_refs(objs, kind, rng) for kind in sv.TYPES]
            rng.shuffle(turns)
            _, _, _, turn, _ = enc.packed([(q, a) for q, a, _ in turns])
            for k, (q, a, _) in enumerate(turns):
                single = enc.first_turn(q) + enc.ids(a) + [td.EOS_ID]
                ref = model(input_ids=torch.tensor([single]), pixel_values=pixels[i:i + 1]).logits[0]
                idx = [j for j, g in enumerate(turn) if g == k]
                n = len(single) - len(idx)
                assert torch.allclose(packed[i, idx], ref[n:], atol=1e-4), (i, q)


def test_bad_arguments_exit_2_and_write_nothing(td, tmp_path):
    for argv in (["--steps", "0"], ["--attn-layer", "9"], ["--log-every", "0"], ["--lr", "0"]):
        with pytest.raises(SystemExit) as e:
            td.main(["--out", str(tmp_path / "m"), *argv])
        assert e.value.code == 2
    assert list(tmp_path.iterdir()) == []


def test_out_that_is_not_a_demo_checkpoint_is_never_replaced(td, tmp_path, capsys):
    mine = tmp_path / "my-project"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    afile = tmp_path / "a-file"
    afile.write_text("keep me too")
    for out in (mine, afile):
        with pytest.raises(SystemExit) as e:
            td.main(["--out", str(out)])
        assert e.value.code == 2 and "is not a vtc demo checkpoint" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep me" and afile.read_text() == "keep me too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "my-project"]
