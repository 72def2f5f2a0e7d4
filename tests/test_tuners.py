"""What training trains: the freeze switches as ms-swift arguments, the coord-rows-only embeddings and head."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from coordexp.core.config import ConfigError, Params, validate_params


def _cli(tmp_path: Path, **train) -> dict[str, str]:
    from coordexp.train.stage import swift_cli_args

    base = tmp_path / "base"
    base.mkdir(exist_ok=True)
    (base / "config.json").write_text(json.dumps({"model_type": "qwen3_vl"}))
    params = Params.model_validate({"train": train})
    cli = swift_cli_args(params, base, tmp_path / "t.jsonl", tmp_path / "v.jsonl", tmp_path / "out", tmp_path)
    flags = [i for i, a in enumerate(cli) if a.startswith("--")]
    return {cli[i][2:]: cli[i + 1] for i in flags if i + 1 < len(cli) and not cli[i + 1].startswith("--")}


def test_freeze_switches_reach_swift(tmp_path):
    args = _cli(tmp_path)
    assert (args["tuner_type"], args["freeze_vit"], args["freeze_aligner"], args["freeze_llm"]) == (
        "full",
        "false",
        "false",
        "false",
    )
    args = _cli(tmp_path, freeze={"vit": True, "llm": True})
    assert (args["freeze_vit"], args["freeze_aligner"], args["freeze_llm"]) == ("true", "false", "true")


def test_lora_reaches_swift(tmp_path):
    from coordexp.train.stage import swift_cli_args

    args = _cli(tmp_path, tuner="lora")
    assert (args["tuner_type"], args["lora_rank"], args["lora_alpha"], args["lora_dropout"]) == (
        "lora",
        "8",
        "32.0",
        "0.05",
    )
    # ms-swift picks the adapters' target layers from its freeze switches: the decoder only, by default
    assert (args["freeze_vit"], args["freeze_aligner"], args["freeze_llm"]) == ("true", "true", "false")
    lora = {"rank": 4, "target_modules": ["q_proj", "v_proj"], "vit": True, "llm": False}
    args = _cli(tmp_path, tuner="lora", lora=lora)
    assert (args["lora_rank"], args["freeze_vit"], args["freeze_llm"]) == ("4", "false", "true")
    base = tmp_path / "base"
    cli = swift_cli_args(Params.model_validate({"train": {"tuner": "lora", "lora": lora}}), base, base, base, base)
    assert cli[cli.index("--target_modules") :][:3] == ["--target_modules", "q_proj", "v_proj"]


def test_freeze_refuses_what_cannot_train():
    with pytest.raises(ConfigError, match=r"train\.freeze\.vit / train\.freeze\.aligner / train\.freeze\.llm"):
        validate_params({"train": {"freeze": {"vit": True, "aligner": True, "llm": True}}})
    with pytest.raises(ConfigError, match=r"train\.weight_decay: 0"):  # decay would move the frozen rows
        validate_params({"train": {"freeze": {"llm": True}, "weight_decay": 0.01}})
    with pytest.raises(ConfigError, match="freeze"):
        validate_params({"train": {"freeze": {"decoder": True}}})
    assert validate_params({"train": {"freeze": {"llm": True}}}).train.coord_rows_only
    assert not validate_params({}).train.coord_rows_only
    with pytest.raises(ConfigError, match=r"train\.lora\.vit / train\.lora\.aligner / train\.lora\.llm"):
        validate_params({"train": {"tuner": "lora", "lora": {"llm": False}}})
    with pytest.raises(ConfigError, match=r"train\.freeze applies to full training"):
        validate_params({"train": {"tuner": "lora", "freeze": {"vit": True}}})
    with pytest.raises(ConfigError, match=r"train\.tuner: lora would move"):
        validate_params({"train": {"tuner": "lora", "weight_decay": 0.1}})
    with pytest.raises(ConfigError, match=r"evaluate\.checkpoints: last"):  # the checkpoints are adapters
        validate_params({"train": {"tuner": "lora"}, "evaluate": {"checkpoints": "all"}})


class _LM(torch.nn.Module):
    """A decoder's embedding and head around one frozen layer, tied or not."""

    def __init__(self, tied: bool):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(12, 4)
        self.body = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 12, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head

    def forward(self, ids):
        return self.head(self.body(self.embed(ids)))


@pytest.mark.parametrize("tied", [True, False])
def test_coord_rows_alone_train(tied):
    from coordexp.train.trainer import train_coord_rows_only, trainable_counts

    model = _LM(tied)
    model.requires_grad_(False)  # what ms-swift's --freeze_llm leaves
    cmap = torch.full((12,), -1)
    cmap[8:12] = torch.arange(4)  # the last four ids are coord tokens
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = train_coord_rows_only(model, cmap)
    assert len(weights) == (1 if tied else 2)
    counts = trainable_counts(model, weights, 4)
    assert counts["trainable_params"] == 4 * 4 * len(weights)
    assert counts["total_params"] == sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.0)
    for _ in range(3):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(torch.tensor([[1, 9, 3, 10]]))[0], torch.tensor([9, 2, 11, 5]))
        loss.backward()
        opt.step()
    after = model.state_dict()
    assert torch.equal(after["body.weight"], before["body.weight"])
    for k in ("embed.weight", "head.weight"):
        assert torch.equal(after[k][:8], before[k][:8]), k  # the original vocabulary: bit-identical
        assert not torch.equal(after[k][8:], before[k][8:]), k  # the coord rows learn


def test_merge_lora_writes_the_adapters_and_coord_rows_into_a_full_checkpoint(tmp_path):
    """A peft adapter plus the trained coord rows -> the merged model, as a plain checkpoint with the base's
    tokenizer and processor files; the other vocabulary rows are the base's."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from test_build_base import SMALL, write_dataset
    from transformers import AutoModelForImageTextToText

    from coordexp.build_base.tiny import build_tiny
    from coordexp.core.vocab import coord_id_map
    from coordexp.train.merge import merge_lora, save_coord_rows
    from coordexp.train.swift_config import COORD_ROWS_FILE

    base = build_tiny(write_dataset(tmp_path / "data", n=4), tmp_path / "base", **SMALL)
    cmap = coord_id_map(base)
    model = AutoModelForImageTextToText.from_pretrained(base)
    lora = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a trained adapter (peft starts B at zero)
        emb = lora.get_input_embeddings().weight
        emb[cmap >= 0] += 1.0  # trained coord rows
    ckpt = tmp_path / "checkpoint-1"
    lora.save_pretrained(ckpt)
    save_coord_rows(lora, cmap, ckpt / COORD_ROWS_FILE)
    want = {k: v.clone() for k, v in lora.merge_and_unload().state_dict().items()}

    final = tmp_path / "final"
    merge_lora(base, ckpt, final, "float32")
    got = load_file(str(final / "model.safetensors"))
    before = load_file(str(base / "model.safetensors"))
    assert set(got) == set(before)
    assert all(torch.equal(got[k], want[k]) for k in got)
    key = next(k for k in got if k.endswith("embed_tokens.weight"))
    assert torch.equal(got[key][cmap < 0], before[key][cmap < 0])
    assert torch.equal(got[key][cmap >= 0], before[key][cmap >= 0] + 1.0)
    assert {"tokenizer.json", "config.json", "coord_vocab.json"} <= {p.name for p in final.iterdir()}
    assert not (final / "build_info.json").exists() and not (final / "adapter_config.json").exists()
