"""Two gloo ranks, each on half the calibration sequences, reduce to the statistics of one process on all."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny import calib, tiny_model

from pruning.gradients import collect_gradients
from pruning.stats import ActivationCollector, GradientCollector
from pruning.structure import ModelStructure

GRAD_KINDS = ("sum", "sum_sq", "sum_abs", "sum_abs_gw")

torch.set_num_threads(1)  # 2 shared CPU cores: oversubscribed threads make tiny models 10x slower


def _batches():
    return calib(n=8, seq=12, seed=7)  # 4 batches of 2 sequences


def _statistics(batches) -> dict:
    model = tiny_model("llama", layers=2, seed=0)
    s = ModelStructure(model)
    act = ActivationCollector(s.targets()).attach()
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    act.detach()
    names = [n + ".weight" for n in s.targets() if ".layers.1." in n]
    group_sets = s.group_sets("mlp_neuron") + s.group_sets("attention_head")
    grads = GradientCollector(model, names, GRAD_KINDS, group_sets, ("coupled", "vector"))
    collect_gradients(model, batches, grads, progress=False)
    act.reduce()
    grads.reduce()
    return {"act": act.state_dict(), "grad": grads.state_dict()}


def _worker(rank: int, port: int, path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        batches = _batches()
        mine = batches[rank::2]  # each rank: half of the sequences
        out = _statistics(mine)
        if rank == 0:
            torch.save(out, path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _assert_same(got: dict, want: dict, prefix: str = "") -> None:
    assert set(got) == set(want), prefix
    for k in want:
        if isinstance(want[k], dict):
            _assert_same(got[k], want[k], f"{prefix}{k}/")
        elif torch.is_tensor(want[k]):
            assert got[k].dtype == torch.float32, prefix + k
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=f"{prefix}{k}")
        else:
            assert got[k] == want[k], prefix + k


def test_two_rank_reduce_equals_one_process(tmp_path):
    path = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(_free_port(), path), nprocs=2, join=True)
    got = torch.load(path)
    want = _statistics(_batches())  # no process group here: reduce is a no-op
    # counts: tokens for activations, sequences for gradients
    assert want["act"]["model.layers.0.self_attn.q_proj"]["count"] == 8 * 12
    assert want["grad"]["model.layers.1.mlp.up_proj.weight"]["count"] == 8
    assert set(want["grad"]["model.layers.1.mlp.up_proj.weight"]["sums"]) == set(GRAD_KINDS)
    assert set(want["grad"]["mlp_neuron.0"]["sums"]) == {"coupled", "vector"}
    _assert_same(got, want)
    # the comparison is not vacuous: a single rank's half differs from the whole
    half = _statistics(_batches()[0::2])
    assert not torch.allclose(half["grad"]["mlp_neuron.1"]["sums"]["coupled"],
                              want["grad"]["mlp_neuron.1"]["sums"]["coupled"])


def test_reduce_without_process_group_is_noop():
    assert not dist.is_initialized()
    model = tiny_model("llama", layers=1)
    s = ModelStructure(model)
    act = ActivationCollector(s.targets()).attach()
    with torch.no_grad():
        model(input_ids=_batches()[0], use_cache=False)
    act.detach()
    before = {k: v["sums"]["sum_sq"].clone() for k, v in act.state_dict().items()}
    act.reduce()
    for k, v in act.state_dict().items():
        assert torch.equal(v["sums"]["sum_sq"], before[k])

