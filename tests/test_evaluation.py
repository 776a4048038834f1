"""Perplexity protocol: the numbers equal a hand computation (non-overlapping, sliding, BOS per window / per stream),
the protocol is recorded, the torchmetrics metric and the distributed path equal one process, and the evaluation
callback logs dense and pruned numbers in one Lightning run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from tiny import BYTE_VOCAB, byte_model, tiny_config_dict
from torch.utils.data import DataLoader

from pruning.evaluation.harness import byte_tokenizer
from pruning.evaluation.metrics import PerplexityMetric
from pruning.evaluation.perplexity import (
    PerplexityProtocol,
    evaluate_perplexity,
    perplexity,
    perplexity_windows,
    token_stream,
)
from pruning.text.tokens import bytes_to_unicode

DOCS = [
    "def add(a, b):\n    return a + b\n",
    "",
    "class Point:\n    x: int = 0\n    y: int = 0\n",
    "print('héllo')  # non-ASCII bytes too\n",
    "import os\nprint(os.sep)\n",
]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return path


def bos_tokenizer():
    """The byte tokenizer with a BOS token (id 1, a control byte absent from the text)."""
    tok = byte_tokenizer()
    tok.bos_token = bytes_to_unicode()[1]
    assert tok.bos_token_id == 1
    return tok


@torch.no_grad()
def hand_ppl(model, ids: list[int], seq_len: int, stride: int | None, bos: str, bos_id: int = 1) -> tuple[float, int]:
    """Hugging Face's sliding-window recipe, written out: windows of ``text`` tokens every ``stride``, each scoring
    the tokens after the previous window's end; NLL from F.cross_entropy in float64, one target at a time."""
    if bos == "stream":
        ids = [bos_id] + ids
    text = seq_len - 1 if bos == "window" else seq_len
    stride = stride or text
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids) - text + 1, stride):
        end = begin + text
        window = ([bos_id] if bos == "window" else []) + ids[begin:end]
        offset = 1 if bos == "window" else 0
        logits = model(input_ids=torch.tensor([window]), use_cache=False).logits[0].double()
        for pos in range(max(prev_end, begin), end):  # text position `pos` -> index in the window
            j = pos - begin + offset
            if j == 0:
                continue  # the first token of a window without BOS has nothing to be predicted from
            nll += float(F.cross_entropy(logits[j - 1 : j], torch.tensor([window[j]])))
            count += 1
        prev_end = end
    return math.exp(nll / count), count


@pytest.mark.parametrize(
    ("seq_len", "stride", "bos"),
    [(16, None, "none"), (16, 5, "none"), (16, None, "window"), (16, 4, "window"), (16, None, "stream")],
)
def test_perplexity_equals_hand_computation(text_file, seq_len, stride, bos):
    model = byte_model()
    protocol = PerplexityProtocol(
        source=str(text_file),
        seq_len=seq_len,
        stride=stride,
        add_bos={"none": False, "window": True, "stream": "stream"}[bos],
    )
    tok = bos_tokenizer() if bos != "none" else "bytes"
    res = evaluate_perplexity(model, tok, protocol, batch_size=3)
    ids = list("\n\n".join(DOCS).encode())
    want, count = hand_ppl(model, ids, seq_len, stride, bos)
    assert res.tokens == count
    assert res.ppl == pytest.approx(want, rel=1e-5)
    assert res.protocol["stride"] == (stride or (seq_len - 1 if bos == "window" else seq_len))
    assert res.protocol["add_bos"] == bos
    if stride is not None and bos == "none":  # every token after the first, up to the last window's end, once
        assert count == (res.windows - 1) * stride + seq_len - 1


def test_protocol_is_recorded_and_defaults_are_the_papers(text_file):
    p = PerplexityProtocol()
    assert p.as_dict() == {
        "source": "wikitext",
        "dataset_config": "wikitext-2-raw-v1",
        "split": "test",
        "text_field": "text",
        "joiner": "\n\n",
        "seq_len": 2048,
        "stride": 2048,
        "add_bos": "none",
        "max_windows": None,
        "source_kind": "hub",
    }
    model = byte_model()
    res = evaluate_perplexity(model, "bytes", {"source": str(text_file), "seq_len": 8, "max_windows": 3})
    assert res.windows == 3 and res.tokens == 3 * 7 and res.tokenizer == "bytes"
    assert res.protocol["source_kind"] == "local" and res.protocol["split"] is None
    assert res.stream_tokens == len("\n\n".join(DOCS).encode())
    # the byte tokenizer and "bytes" give the same ids, so the same number and the same sha256 of the inputs
    again = evaluate_perplexity(model, byte_tokenizer(), {"source": str(text_file), "seq_len": 8, "max_windows": 3})
    assert again.ppl == pytest.approx(res.ppl, rel=1e-9) and again.sha256 == res.sha256
    with pytest.raises(ValueError, match="stride"):
        PerplexityProtocol(seq_len=8, stride=9)
    with pytest.raises(ValueError, match="add_bos"):
        PerplexityProtocol(add_bos="sometimes")
    with pytest.raises(ValueError, match="no BOS"):
        evaluate_perplexity(model, "bytes", PerplexityProtocol(source=str(text_file), seq_len=8, add_bos=True))
    assert PerplexityProtocol.from_dict({"preset": "stdlib", "seq_len": 64}).as_dict()["split"] == "heldout"


def test_old_function_and_the_stdlib_preset_agree():
    """``evaluate_perplexity`` on the stdlib preset scores exactly the demo's windows (``pruning.perplexity``)."""
    from pruning.text.stdlib import stdlib_bytes, windows

    model = byte_model()
    protocol = PerplexityProtocol.preset("stdlib", seq_len=32, max_windows=6)
    res = evaluate_perplexity(model, "bytes", protocol, batch_size=6)
    demo_windows = windows(stdlib_bytes("heldout", max_bytes=32 * 6), 32, 6)
    assert res.ppl == pytest.approx(perplexity(model, [demo_windows]), rel=1e-6)


def test_metric_equals_function(text_file):
    model = byte_model()
    protocol = PerplexityProtocol(source=str(text_file), seq_len=16, stride=6)
    inputs, labels = perplexity_windows(token_stream(protocol, "bytes"), protocol)
    metric = PerplexityMetric()
    with torch.no_grad():
        for i in range(0, len(inputs), 2):
            metric.update(model(input_ids=inputs[i : i + 2]).logits, labels[i : i + 2])
    res = evaluate_perplexity(model, "bytes", protocol)
    assert float(metric.compute()) == pytest.approx(res.ppl, rel=1e-9)
    assert int(metric.token_count) == res.tokens
    assert metric.nll_sum.dtype == torch.float64


def test_every_perplexity_path_gives_the_same_sums(text_file):
    """The protocol, the torchmetrics metric, the report callback's held-out NLL and the LightningModule's validation
    all sum the same per-token NLL: equal sums, bit for bit, on the same windows."""
    import lightning.pytorch as pl

    from pruning.callbacks.report import heldout_nll
    from pruning.evaluation.nll import summed_nll
    from pruning.lightning.module import DistillationModule

    module = DistillationModule(
        config=tiny_config_dict(vocab_size=BYTE_VOCAB, max_position_embeddings=512), attn_implementation="eager"
    )
    model = module.student.eval()
    protocol = PerplexityProtocol(source=str(text_file), seq_len=16, stride=6)
    inputs, labels = perplexity_windows(token_stream(protocol, "bytes"), protocol)
    res = evaluate_perplexity(model, "bytes", protocol, batch_size=2)
    loader = [{"input_ids": inputs[i : i + 2], "labels": labels[i : i + 2]} for i in range(0, len(inputs), 2)]
    assert heldout_nll(model, loader, "cpu") == (res.nll, res.tokens)
    metric = PerplexityMetric()
    with torch.no_grad():
        for batch in loader:
            metric.update(model(input_ids=batch["input_ids"]).logits, batch["labels"])
    nll, tokens = metric.totals()
    assert (float(nll), int(tokens)) == (res.nll, res.tokens)
    # the old function: every token after the first of each window is scored
    windows = [inputs[i : i + 2] for i in range(0, len(inputs), 2)]
    nll, tokens = summed_nll(model, [{"input_ids": w} for w in windows])
    assert tokens == inputs.shape[0] * (inputs.shape[1] - 1)
    assert perplexity(model, windows) == math.exp(nll / tokens)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    logged = trainer.validate(module, DataLoader(loader, batch_size=None), verbose=False)[0]
    assert logged["val/loss"] == pytest.approx(res.nll / res.tokens, rel=1e-12)
    assert logged["val/ppl"] == pytest.approx(res.ppl, rel=1e-12)


# ---------------------------------------------------------------------------------------------------- two ranks
def _worker(rank: int, port: int, path: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = byte_model()
        protocol = PerplexityProtocol(source=path, seq_len=16, stride=6)
        inputs, labels = perplexity_windows(token_stream(protocol, "bytes"), protocol)
        metric = PerplexityMetric()
        with torch.no_grad():
            for i in range(rank, len(inputs), 2):  # this rank's half of the windows
                metric.update(model(input_ids=inputs[i : i + 1]).logits, labels[i : i + 1])
        synced = float(metric.compute())  # torchmetrics all-reduces the sums
        local = int(metric.token_count)  # after compute() the state is this rank's again
        res = evaluate_perplexity(model, "bytes", protocol, distributed=True)
        if rank == 0:
            torch.save({"metric": synced, "local_tokens": local, "function": res.ppl, "tokens": res.tokens}, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_two_ranks_equal_one_process(text_file, tmp_path, free_port):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(free_port, str(text_file), out), nprocs=2, join=True)
    got = torch.load(out)
    model = byte_model()
    want = evaluate_perplexity(model, "bytes", PerplexityProtocol(source=str(text_file), seq_len=16, stride=6))
    assert got["metric"] == pytest.approx(want.ppl, rel=1e-9)
    assert got["function"] == pytest.approx(want.ppl, rel=1e-9)
    assert got["tokens"] == want.tokens
    assert 0 < got["local_tokens"] < want.tokens  # each rank scored only its share


# ---------------------------------------------------------------------------------------------------- callback
def test_callback_logs_dense_and_pruned_numbers(text_file, tmp_path):
    # lightning imported here, not at the top: the two-rank test's spawned processes import this module
    import lightning.pytorch as pl
    from lightning.pytorch.loggers.logger import Logger

    from pruning.callbacks import PruningCallback
    from pruning.callbacks.evaluation import EvaluationCallback
    from pruning.lightning.module import DistillationModule
    from pruning.schedule import Schedule

    class Recorder(Logger):
        def __init__(self) -> None:
            super().__init__()
            self.logged: dict[str, tuple[float, int]] = {}

        @property
        def name(self) -> str:
            return "recorder"

        @property
        def version(self) -> str:
            return "0"

        def log_hyperparams(self, params, *args, **kwargs) -> None:
            pass

        def log_metrics(self, metrics, step=None) -> None:
            for k, v in metrics.items():
                self.logged[k] = (float(v), step)

    cfg = tiny_config_dict(vocab_size=BYTE_VOCAB, max_position_embeddings=512)
    module = DistillationModule(config=cfg, attn_implementation="eager", lr=1e-2)
    g = torch.Generator().manual_seed(0)
    data = DataLoader([{"input_ids": torch.randint(0, 256, (16,), generator=g)} for _ in range(8)], batch_size=2)
    pruner = PruningCallback(
        criterion="magnitude", granularity="mlp_neuron", schedule=Schedule(kind="one_shot", step=2, sparsity=0.3)
    )
    evaluation = EvaluationCallback(
        perplexity={"source": str(text_file), "seq_len": 16},
        tasks=["stdlib_mc"],
        limit=4,
        batch_size=4,
        when=["fit_start", "after_pruning", "fit_end"],
        path=str(tmp_path / "eval.json"),
    )
    logger = Recorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=4,
        callbacks=[evaluation, pruner],
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)
    logged = logger.logged
    for moment, step in [("fit_start", 0), ("after_pruning", 2), ("fit_end", 4)]:
        assert logged[f"eval/{moment}/ppl"][1] == step
        assert 0 <= logged[f"eval/{moment}/stdlib_mc/acc"][0] <= 1
    # the dense number is the model before any step, the pruned one the same weights with 30 % of neurons gone
    assert logged["eval/fit_start/ppl"][0] != logged["eval/after_pruning/ppl"][0]
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert set(saved["results"]) == {"fit_start", "after_pruning", "fit_end"}
    assert saved["perplexity_protocol"]["seq_len"] == 16
    assert "| metric | dense (fit start) @ step 0 | pruned @ step 2 | fit end @ step 4 |" in evaluation.table()
    assert module.student.training  # the evaluation put it back in training mode
