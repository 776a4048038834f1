"""Surgery: compacted models compute what the masked models computed, exports are atomic and load back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import FAMILY_NAMES, calib, tiny_model

import pruning
from pruning.structure import ModelStructure

ATOL = 1e-5
CASES = [
    (fam, gran)
    for fam in FAMILY_NAMES
    for gran in ("mlp_neuron", "attention_head", "query_head", "layer")
    if not (fam in ("opt", "gpt_neox") and gran == "query_head")  # OPT and GPT-NeoX have no GQA
]


def _ids(seed: int = 1) -> torch.Tensor:
    return calib(2, 12, seed=seed)[0]


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _greedy(model, ids: torch.Tensor) -> torch.Tensor:
    return model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)


def _nparams(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _expected_drop(model, masks: pruning.MaskSet) -> int:
    """Removed groups × params_per_group; a removed layer also takes its norms (not counted by its GroupSet)."""
    structure = ModelStructure(model)
    drop = 0
    for key, keep in masks.groups.items():
        gs = masks.group_sets[key]
        removed = int((~keep).sum())
        drop += gs.params_per_group * removed
        if gs.kind == "layer" and removed:
            linear_names = {m.name for m in gs.members}
            prefix = structure.layer_infos[gs.layer].prefix
            drop += sum(
                p.numel() for n, p in model.named_parameters() if n.startswith(prefix) and n not in linear_names
            )
    return drop


@pytest.mark.parametrize("family,granularity", CASES)
def test_compact_equals_masked_and_reload(tmp_path: Path, family: str, granularity: str) -> None:
    model = tiny_model(family, layers=4)
    sparsity = 0.25 if granularity == "layer" else 0.5
    res = pruning.prune(model, calib(), method="magnitude", sparsity=sparsity, granularity=granularity, progress=False)
    ids = _ids()
    masked = _logits(model, ids)
    masked_gen = _greedy(model, ids)
    before = _nparams(model)
    expected = _expected_drop(model, res.masks)
    assert expected > 0

    out = pruning.compact(model, res.masks)
    assert out is model
    assert not res.masks.groups and not res.masks.group_sets
    assert before - _nparams(model) == expected
    torch.testing.assert_close(_logits(model, ids), masked, atol=ATOL, rtol=0)
    assert torch.equal(_greedy(model, ids), masked_gen)
    if granularity == "layer":
        assert model.config.num_hidden_layers == 3
        s = ModelStructure(model)
        attention = s.family.o.rpartition(".")[0]
        assert [layer.get_submodule(attention).layer_idx for layer in s.layers] == [0, 1, 2]
        if getattr(model.config, "layer_types", None) is not None:
            assert len(model.config.layer_types) == 3

    pruning.save_pretrained(model, tmp_path / "export")
    assert list((tmp_path / "export").glob("*.safetensors"))
    assert not list((tmp_path / "export").glob("*.bin"))
    loaded = pruning.load_pretrained(tmp_path / "export", attn_implementation="eager")
    assert _nparams(loaded) == _nparams(model)
    torch.testing.assert_close(_logits(loaded, ids), masked, atol=ATOL, rtol=0)
    assert torch.equal(_greedy(loaded, ids), masked_gen)


def test_uniform_export_loads_with_plain_transformers(tmp_path: Path) -> None:
    model = tiny_model("llama", layers=2)
    res = pruning.prune(model, calib(), method="magnitude", sparsity=0.5, granularity="mlp_neuron", progress=False)
    pruning.compact(model, res.masks)
    assert not model.config.is_heterogeneous and model.config.intermediate_size == 32
    ids = _ids()
    ref = _logits(model, ids)
    pruning.save_pretrained(model, tmp_path / "export", manifest={"note": "uniform"})
    save_file({"ids": ids}, str(tmp_path / "ids.safetensors"))
    code = (
        "import sys, torch\n"
        "from safetensors.torch import load_file, save_file\n"
        "from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained('export', attn_implementation='eager').eval()\n"
        "ids = load_file('ids.safetensors')['ids']\n"
        "with torch.no_grad():\n"
        "    out = m(input_ids=ids, use_cache=False).logits\n"
        "save_file({'logits': out.contiguous()}, 'logits.safetensors')\n"
        "assert 'pruning' not in sys.modules\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    torch.testing.assert_close(load_file(str(tmp_path / "logits.safetensors"))["logits"], ref, atol=ATOL, rtol=0)
    manifest = json.loads((tmp_path / "export" / "pruning_manifest.json").read_text())
    assert manifest["note"] == "uniform"
    assert manifest["parameters"] == _nparams(model)
    assert manifest["kept_per_layer"][0]["intermediate_size"] == 32
    assert {"torch", "transformers", "safetensors", "lightning", "peft", "datasets", "lm_eval"} <= set(
        manifest["library_versions"]
    )
    assert "created" in manifest


@pytest.mark.parametrize("how", ["global", "rates", "query_head_rates"])
def test_non_uniform_export_roundtrip(tmp_path: Path, how: str) -> None:
    from transformers import AutoModelForCausalLM

    model = tiny_model("qwen3" if how == "query_head_rates" else "llama", layers=2)
    if how == "global":
        res = pruning.prune(
            model,
            calib(),
            method="magnitude",
            sparsity=0.5,
            granularity="mlp_neuron",
            allocation="global",
            progress=False,
        )
    elif how == "rates":
        res = pruning.prune(
            model,
            calib(),
            method="magnitude",
            sparsity=0.5,
            granularity="mlp_neuron",
            allocation="rates",
            layer_rates=[0.25, 0.5],
            progress=False,
        )
    else:
        res = pruning.prune(
            model,
            calib(),
            method="magnitude",
            sparsity=0.5,
            granularity="query_head",
            allocation="rates",
            layer_rates=[0.0, 0.5],
            progress=False,
        )
    kept = [int(k.sum()) for k in res.masks.groups.values()]
    if len(set(kept)) == 1:
        pytest.skip(f"allocation {how} happened to keep the same width everywhere: {kept}")
    ids = _ids()
    ref = _logits(model, ids)
    ref_gen = _greedy(model, ids)
    pruning.compact(model, res.masks)
    assert model.config.is_heterogeneous
    torch.testing.assert_close(_logits(model, ids), ref, atol=ATOL, rtol=0)
    pruning.save_pretrained(model, tmp_path / "export")
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    assert len(cfg["per_layer_config"]) >= 1
    loaded = pruning.load_pretrained(tmp_path / "export", attn_implementation="eager")
    torch.testing.assert_close(_logits(loaded, ids), ref, atol=ATOL, rtol=0)
    assert torch.equal(_greedy(loaded, ids), ref_gen)
    with pytest.raises(Exception, match="per-layer"):  # a stock loader refuses instead of building wrong shapes
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"))


def test_element_masks_are_reindexed(tmp_path: Path) -> None:
    model = tiny_model("llama", layers=4)
    res = pruning.prune(model, calib(), method="magnitude", sparsity=0.5, granularity="unstructured", progress=False)
    masks = res.masks
    pruning.prune(
        model, calib(), method="magnitude", sparsity=0.5, granularity="mlp_neuron", masks=masks, progress=False
    )
    pruning.prune(model, calib(), method="magnitude", sparsity=0.25, granularity="layer", masks=masks, progress=False)
    ids = _ids()
    ref = _logits(model, ids)
    pruning.compact(model, masks)
    torch.testing.assert_close(_logits(model, ids), ref, atol=ATOL, rtol=0)
    params = dict(model.named_parameters())
    assert masks.element and not masks.groups
    for name, keep in masks.element.items():
        assert params[name].shape == keep.shape
        assert bool((params[name][~keep] == 0).all())
    masks.apply(model)  # still consistent with the compacted model
    torch.testing.assert_close(_logits(model, ids), ref, atol=ATOL, rtol=0)


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


class _FailingTokenizer:
    def save_pretrained(self, directory: str) -> None:
        Path(directory, "tokenizer.json").write_text("{partial")
        raise OSError("disk full (simulated)")


@pytest.mark.parametrize("where", ["model", "tokenizer"])
def test_failed_export_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    model = tiny_model("llama", layers=2)
    target = tmp_path / "export"
    pruning.save_pretrained(model, target, manifest={"run": 1})
    before = _snapshot(target)
    res = pruning.prune(model, calib(), method="magnitude", sparsity=0.5, granularity="mlp_neuron", progress=False)
    pruning.compact(model, res.masks)
    tokenizer = None
    if where == "model":
        real = model.save_pretrained

        def half_save(directory, **kwargs):
            real(directory, **kwargs)
            Path(directory, "model.safetensors").write_bytes(b"truncated")
            raise RuntimeError("killed mid-write (simulated)")

        monkeypatch.setattr(model, "save_pretrained", half_save)
    else:
        tokenizer = _FailingTokenizer()
    with pytest.raises((RuntimeError, OSError), match="simulated"):
        pruning.save_pretrained(model, target, tokenizer=tokenizer, manifest={"run": 2})
    assert _snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_export_replaces_previous(tmp_path: Path) -> None:
    model = tiny_model("llama", layers=2)
    target = tmp_path / "export"
    pruning.save_pretrained(model, target, manifest={"run": 1})
    res = pruning.prune(model, calib(), method="magnitude", sparsity=0.5, granularity="mlp_neuron", progress=False)
    pruning.compact(model, res.masks)
    pruning.save_pretrained(model, target, manifest={"run": 2})
    assert json.loads((target / "pruning_manifest.json").read_text())["run"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_bad_input() -> None:
    model = tiny_model("llama", layers=2)
    other = tiny_model("llama", layers=2, intermediate_size=48)
    res = pruning.prune(other, calib(), method="magnitude", sparsity=0.5, granularity="mlp_neuron", progress=False)
    with pytest.raises(ValueError, match="HINT"):
        pruning.compact(model, res.masks)
    with pytest.raises(ValueError, match="HINT"):
        pruning.load_pretrained("/nonexistent/export")
    masks = pruning.MaskSet()
    gs = ModelStructure(model).group_sets("attention_head")[0]
    masks.set_groups(gs, torch.zeros(gs.count, dtype=torch.bool))
    with pytest.raises(ValueError, match="no attention head"):
        pruning.compact(model, masks)


STOCK_CODE = (
    "import sys, torch\n"
    "from safetensors.torch import load_file, save_file\n"
    "from transformers import AutoModelForCausalLM\n"
    "ids = load_file('ids.safetensors')['ids']\n"
    "out = {}\n"
    "for name in sys.argv[1:]:\n"
    "    m = AutoModelForCausalLM.from_pretrained(name, attn_implementation='eager').eval()\n"
    "    with torch.no_grad():\n"
    "        out[name] = m(input_ids=ids, use_cache=False).logits.contiguous()\n"
    "save_file(out, 'logits.safetensors')\n"
    "assert 'pruning' not in sys.modules\n"
)


def test_every_family_export_loads_with_stock_transformers(tmp_path: Path) -> None:
    """Uniform MLP neurons (and KV groups where the config can state them) for every family: a stock config, loaded
    by plain ``from_pretrained`` in a process that never imports this project, computing the compacted logits."""
    ids = _ids()
    save_file({"ids": ids}, str(tmp_path / "ids.safetensors"))
    want = {}
    for family in FAMILY_NAMES:
        for granularity in ("mlp_neuron", "attention_head"):
            model = tiny_model(family, layers=2)
            res = pruning.prune(model, calib(), method="wanda", sparsity=0.5, granularity=granularity, progress=False)
            pruning.compact(model, res.masks)
            if model.config.is_heterogeneous:  # head counts some configs cannot state: load_pretrained's (above)
                assert granularity == "attention_head"
                continue
            name = f"{family}-{granularity}"
            pruning.save_pretrained(model, tmp_path / name)
            want[name] = _logits(model, ids)
    assert {n.rsplit("-", 1)[0] for n in want if n.endswith("mlp_neuron")} == set(FAMILY_NAMES)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", STOCK_CODE, *want], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = load_file(str(tmp_path / "logits.safetensors"))
    for name, logits in want.items():
        torch.testing.assert_close(got[name], logits, atol=ATOL, rtol=0, msg=name)


def test_per_layer_export_loads_without_a_full_width_model(tmp_path: Path, monkeypatch) -> None:
    """The per-layer model is built with its parameters on the meta device and its layers at their own widths: no
    weight is initialised or allocated at the full width, every parameter is the export's tensor."""
    model = tiny_model("llama", layers=2)
    res = pruning.prune(
        model, method="magnitude", sparsity=0.5, granularity="mlp_neuron", layer_rates=[0.25, 0.5], progress=False
    )
    pruning.compact(model, res.masks)
    pruning.save_pretrained(model, tmp_path / "export")
    made: list[tuple] = []
    real = torch.nn.Module.register_parameter

    def spy(module, name, param):
        if param is not None and not param.is_meta:
            made.append((type(module).__name__, name, tuple(param.shape)))
        real(module, name, param)

    monkeypatch.setattr(torch.nn.Module, "register_parameter", spy)
    loaded = pruning.load_pretrained(tmp_path / "export", attn_implementation="eager")
    monkeypatch.undo()
    widths = [layer.mlp.down_proj.in_features for layer in loaded.model.layers]
    assert widths == [48, 32]
    assert made and not [m for m in made if m[2] in ((64, 32), (32, 64))]  # no MLP Linear at the full width
    assert not any(p.is_meta for p in loaded.parameters())
    saved = load_file(str(tmp_path / "export" / "model.safetensors"))
    for name, p in loaded.named_parameters():
        assert torch.equal(p, saved[name]), name
    ids = _ids()
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), atol=ATOL, rtol=0)
