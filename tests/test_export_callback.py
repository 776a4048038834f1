"""The export callback writes the compacted model at fit end; the export reloads with the same logits."""

import torch
from lightning.pytorch import LightningModule, Trainer
from tiny import calib, tiny_model
from transformers import AutoModelForCausalLM

import pruning
from pruning.callbacks import ExportOnFitEnd


class UserModule(LightningModule):
    """A user's own LightningModule holding a Hugging Face model at ``.model``."""

    def __init__(self, model, masks):
        super().__init__()
        self.model = model
        self.masks = masks

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def on_fit_start(self):
        self.masks.attach(self.model)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=1e-2, weight_decay=0.1)


def test_export_on_fit_end_compacts_and_reloads(tmp_path):
    model = tiny_model("llama")
    result = pruning.prune(model, calib(), method="magnitude", sparsity=0.5, granularity="mlp_neuron")
    module = UserModule(model, result.masks)
    data = torch.utils.data.DataLoader(torch.randint(0, 128, (4, 16)), batch_size=2)
    trainer = Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ExportOnFitEnd(tmp_path / "export", manifest={"method": "magnitude"})],
    )
    trainer.fit(module, data)
    assert model.config.intermediate_size == 32  # compacted in place: half the neurons are gone
    ids = torch.randint(0, 128, (1, 12))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert (tmp_path / "export" / "pruning_manifest.json").exists()
