"""Nothing loaded from a file runs code: a crafted Lightning checkpoint is refused by ``pruning eval`` before its
payload runs, and weights stored only as pickles (``pytorch_model.bin``) are refused unless the user opts in."""

from __future__ import annotations

import pytest
import torch
from tiny import BYTE_VOCAB, tiny_config_dict, tiny_model

from pruning.loading import PickleRefused


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: a visible side effect standing in for arbitrary code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_eval_refuses_a_checkpoint_with_a_payload(tmp_path):
    from pruning.commands.eval import main

    marker = tmp_path / "payload-ran"
    ckpt = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"config": _Payload(str(marker))}}, ckpt)
    with pytest.raises(SystemExit, match="not plain weights and would run code"):
        main([str(ckpt), "--perplexity", "stdlib", "--device", "cpu"])
    assert not marker.exists()


def test_lora_checkpoint_loads_with_weights_only(tmp_path):
    """The legitimate content of a checkpoint (a LoRA recovery's ``LoraSettings``) is allowed by weights_only."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from pruning.commands.eval import load_for_eval
    from pruning.lightning.module import DistillationModule, LoraSettings

    cfg = tiny_config_dict(vocab_size=BYTE_VOCAB)
    module = DistillationModule(config=cfg, attn_implementation="eager", lora=LoraSettings(r=2, merge_at_end=False))
    data = DataLoader([{"input_ids": torch.randint(0, 256, (16,))} for _ in range(2)], batch_size=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp_path / "lora.ckpt")
    model, _, info = load_for_eval(str(tmp_path / "lora.ckpt"))
    assert info["kind"] == "lightning_checkpoint" and not hasattr(model, "peft_config")


@pytest.fixture
def pickled_export(tmp_path):
    from safetensors.torch import load_file

    model = tiny_model("llama")
    path = tmp_path / "pickled"
    model.save_pretrained(path)
    for f in path.glob("*.safetensors"):  # the same weights as the pickle an older tool would have written
        torch.save(load_file(f), path / "pytorch_model.bin")
        f.unlink()
    return path, model


def test_pickled_weights_are_refused_unless_allowed(pickled_export):
    from pruning import load_pretrained
    from pruning.lightning.module import DistillationModule

    path, model = pickled_export
    with pytest.raises(PickleRefused, match="only as pickles .*pytorch_model.bin.*allow_pickle=True"):
        load_pretrained(path)
    with pytest.raises(PickleRefused, match="model.pretrained="):
        DistillationModule(pretrained=str(path))
    loaded = load_pretrained(path, allow_pickle=True)
    torch.testing.assert_close(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_eval_refuses_pickled_weights(pickled_export):
    from pruning.commands.eval import main

    path, _ = pickled_export
    with pytest.raises(SystemExit, match="only as pickles.*--allow-pickle"):
        main([str(path), "--perplexity", "stdlib", "--device", "cpu"])


def test_search_refuses_pickled_weights(pickled_export):
    from pruning.commands.search import load_model

    path, _ = pickled_export
    with pytest.raises(PickleRefused, match="--model="):
        load_model(str(path))
