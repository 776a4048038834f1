"""Every YAML in configs/ parses against the CLI's signatures (classes not built: no hub download), and its
callbacks can be constructed (their __init__ validation runs)."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.cli import LightningCLI

from pruning.datamodules import TextDataModule
from pruning.lightning.module import DistillationModule
from pruning.schedule import Schedule

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


class ParseOnly(LightningCLI):
    def instantiate_classes(self) -> None:  # parse and type-check only
        pass


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "sdm_llama3.2-1b.yaml", "gblm_llama2-7b.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses(path: Path):
    text = path.read_text()
    assert text.startswith("# pruning fit --config configs/"), "a recipe opens with the command that runs it"
    cli = ParseOnly(DistillationModule, TextDataModule, args=["--config", str(path)], run=False)
    cfg = cli.config
    assert cfg.model.pretrained or cfg.model.config
    for cb in cfg.trainer.callbacks or []:
        module, name = cb.class_path.rsplit(".", 1)
        cls = getattr(__import__(module, fromlist=[name]), name)
        init = cb.init_args.as_dict() if cb.init_args else {}
        if init.get("schedule") is not None:
            init["schedule"] = Schedule(**init["schedule"])
        cls(**init)  # runs the callback's own validation
