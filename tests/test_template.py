"""THE template: one conversation builder for training and inference, encoded through ms-swift."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import SMALL_MODEL

from coordexp.core.codec import encode_xy, parse_coord_token
from coordexp.core.template import IMAGE_TAG, PROMPT, TEMPLATE_NAME, build_messages, encode_record

SMALL = SMALL_MODEL


def _records(root: Path, n: int = 6) -> list[dict]:
    from PIL import Image

    rng = random.Random(1)
    (root / "images").mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(n):
        objs = []
        for _ in range(rng.randint(1, 3)):
            x, y = rng.randint(0, 90), rng.randint(0, 90)
            objs.append(
                {
                    "desc": rng.choice(["red circle", "blue square"]),
                    "bbox_2d": encode_xy([x, y, x + 30, y + 30], 128, 128),
                }
            )
        objs.append({"desc": "blue triangle", "poly": encode_xy([10, 10, 40, 10, 25, 35], 128, 128)})
        objs.append({"desc": "green line", "line": encode_xy([0, 0, 127, 127], 128, 128)})
        Image.new("RGB", (128, 128), (i * 40 % 255, 0, 0)).save(root / "images" / f"{i}.png")
        recs.append({"id": i, "images": [f"images/{i}.png"], "width": 128, "height": 128, "objects": objs})
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return recs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from coordexp.build_base.tiny import build_tiny

    root = tmp_path_factory.mktemp("tmpl")
    recs = _records(root)
    ckpt = build_tiny(root / "train.jsonl", root / "base", **SMALL)
    return root, recs, ckpt


@pytest.fixture(scope="module")
def template(setup):
    from coordexp.core.template import load_template

    return load_template(setup[2], mode="train")


# ---------------------------------------------------------------------------------------------
# build_messages


def test_build_messages_train_and_infer_share_the_user_turn(tmp_path):
    recs = _records(tmp_path, 1)
    train = build_messages(recs[0], tmp_path, with_answer=True)
    infer = build_messages(recs[0], tmp_path, with_answer=False)
    from coordexp.core.contract import render_answer

    assert train["messages"][0] == infer["messages"][0] == {"role": "user", "content": IMAGE_TAG + PROMPT}
    assert train["messages"][0]["content"].startswith(IMAGE_TAG)  # image first, then the text
    assert train["messages"][1] == {"role": "assistant", "content": render_answer(recs[0]["objects"])}
    assert len(infer["messages"]) == 1
    assert train["images"] == infer["images"] == [str((tmp_path / "images" / "0.png").resolve())]
    assert Path(train["images"][0]).is_absolute() and Path(train["images"][0]).is_file()


def test_build_messages_accepts_contract_records(tmp_path):
    from coordexp.core.contract import read_jsonl

    recs = _records(tmp_path, 2)
    validated = read_jsonl(tmp_path / "train.jsonl")
    assert build_messages(validated[1], tmp_path, True) == build_messages(recs[1], tmp_path, True)


# ---------------------------------------------------------------------------------------------
# ms-swift template


def test_register_is_idempotent_and_leaves_stock_template_alone():
    from swift.template import TEMPLATE_MAPPING
    from swift.template.templates.qwen import Qwen3VLTemplate

    from coordexp.core.template import TEMPLATE_NAME_QWEN2_5_VL, register_swift_template

    stock = list(Qwen3VLTemplate.placeholder_tokens)
    assert register_swift_template() == TEMPLATE_NAME
    meta = TEMPLATE_MAPPING[TEMPLATE_NAME]
    assert register_swift_template() == TEMPLATE_NAME
    assert TEMPLATE_MAPPING[TEMPLATE_NAME] is meta
    assert TEMPLATE_NAME_QWEN2_5_VL in TEMPLATE_MAPPING
    assert issubclass(meta.template_cls, Qwen3VLTemplate)
    assert Qwen3VLTemplate.image_token_id == 151655 and list(Qwen3VLTemplate.placeholder_tokens) == stock


def test_template_uses_the_tokenizers_image_ids(template):
    tok = template.tokenizer
    assert template.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>") != 151655
    assert template.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")


def test_encode_labels_cover_exactly_the_answer(setup, template):
    from coordexp.core.contract import render_answer
    from coordexp.core.vocab import coord_id_map

    root, recs, ckpt = setup
    tok = template.tokenizer
    cmap = coord_id_map(ckpt, tok)
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    for rec in recs:
        enc = encode_record(template, rec, root)
        ids, labels = enc["input_ids"], enc["labels"]
        assert len(ids) == len(labels) == len(enc["attention_mask"])
        sup = [i for i, lab in enumerate(labels) if lab != -100]
        # one contiguous supervised span at the end, labels unshifted (= input ids)
        assert sup == list(range(sup[0], sup[-1] + 1))
        assert all(labels[i] == ids[i] for i in sup)
        # prompt and image positions are unsupervised
        img_pos = [i for i, t in enumerate(ids) if t == image_id]
        assert len(img_pos) == int(enc["image_grid_thw"].prod()) // 4 == 64  # 128 px, 8 px patches merged 2x2
        assert max(img_pos) < sup[0]
        # the span is the assistant JSON + end of turn (ms-swift also keeps the newline after it)
        answer = render_answer(rec["objects"])
        text = tok.decode([labels[i] for i in sup])
        assert text.startswith(answer + "<|im_end|>") and text[len(answer) + len("<|im_end|>") :].strip() == ""
        assert tok.decode(ids[: sup[0]]).endswith("<|im_start|>assistant\n")
        # every coord token of the answer is a coord position, in order, with its bin
        lab = torch.tensor(labels)
        bins = cmap[lab.clamp(min=0)][lab >= 0]
        got = bins[bins >= 0].tolist()
        want = [parse_coord_token(t) for o in rec["objects"] for k, v in o.items() if k != "desc" for t in v]
        assert got == want
        # and nothing outside the supervised span is a coord id
        assert int((cmap[torch.tensor(ids[: sup[0]])] >= 0).sum()) == 0


def test_inference_prompt_is_the_training_prefix(setup, template):
    """Same image/text order at train and inference (DESIGN: defect 'image first in training only')."""
    from coordexp.core.template import load_template

    root, recs, ckpt = setup
    infer_t = load_template(ckpt, mode="transformers")
    for rec in recs[:3]:
        train = encode_record(template, rec, root)
        infer = encode_record(infer_t, rec, root, with_answer=False)
        n = len(infer["input_ids"])
        assert infer["input_ids"] == train["input_ids"][:n]
        assert train["labels"][n - 1] == -100 and train["labels"][n] != -100
        assert torch.equal(infer["pixel_values"], train["pixel_values"])


def test_collated_batch_runs_through_the_model(setup, template):
    from transformers import Qwen3VLForConditionalGeneration

    root, recs, ckpt = setup
    model = Qwen3VLForConditionalGeneration.from_pretrained(str(ckpt))
    template.model = model  # swift's collator computes M-RoPE position ids with the model
    batch = template.data_collator([encode_record(template, r, root) for r in recs[:3]])
    batch = {k: v for k, v in batch.items() if k != "text_position_ids"}
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.get_input_embeddings().weight.grad is not None


def test_hf_chat_template_renders_the_same_prompt(setup, template):
    """transformers' apply_chat_template (HF / vLLM inference) gives the ids ms-swift trains on."""
    from PIL import Image
    from transformers import AutoProcessor

    from coordexp.core.template import load_template, to_hf_messages

    root, recs, ckpt = setup
    proc = AutoProcessor.from_pretrained(str(ckpt))
    infer_t = load_template(ckpt, mode="transformers")
    rec = recs[0]
    row = build_messages(rec, root, with_answer=False)
    msgs = to_hf_messages(row)
    assert msgs == [
        {"role": "user", "content": [{"type": "image", "image": row["images"][0]}, {"type": "text", "text": PROMPT}]}
    ]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    hf = proc(text=[text], images=[Image.open(row["images"][0]).convert("RGB")], return_tensors="pt")
    sw = encode_record(infer_t, rec, root, with_answer=False)
    assert hf["input_ids"][0].tolist() == sw["input_ids"]
    assert torch.equal(hf["image_grid_thw"], sw["image_grid_thw"])
