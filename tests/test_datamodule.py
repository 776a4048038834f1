"""TextDataModule: hand-joined token streams, seeded windows, Alpaca labels, disjoint equal shards, exact resume."""

import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer

from pruning.datamodules import TextDataModule, alpaca_prompt
from pruning.datamodules.text import IGNORE_INDEX
from pruning.text.stdlib import stdlib_bytes, windows


def cut(stream: bytes, seq_len: int) -> torch.Tensor:
    """The hand-made expectation: a byte stream cut into consecutive ``seq_len`` windows, remainder dropped."""
    n = len(stream) // seq_len
    return torch.tensor(list(stream[: n * seq_len]), dtype=torch.long).view(n, seq_len)


def numbered(path: Path, count: int, start: int = 0) -> Path:
    """``count`` lines ``0000000\\n``, ``0000001\\n``...: with seq_len=8 every sequence is one distinct line."""
    path.write_text("".join(f"{i:07d}\n" for i in range(start, start + count)))
    return path


def rows(batches) -> list[bytes]:
    return [bytes(r.tolist()) for b in batches for r in b["input_ids"]]


def dm(source, tmp_path, **kw) -> TextDataModule:
    kw.setdefault("val_samples", 0)
    return TextDataModule(source=str(source), cache_dir=str(tmp_path / "hf-cache"), **kw)


# --------------------------------------------------------------------------------------------------- sources


def test_packed_txt_equals_hand_joined_stream(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("alpha beta\n")
    (tmp_path / "docs" / "b.txt").write_text("gamma")
    data = dm(tmp_path / "docs", tmp_path, seq_len=4, batch_size=2)
    seqs = data.sequences("train")
    # one document per file, each followed by the separator "\n\n": 13 + 7 = 20 bytes -> 5 windows of 4
    expected = cut(b"alpha beta\n\n\ngamma\n\n", 4)
    assert torch.equal(seqs["input_ids"], expected) and torch.equal(seqs["labels"], expected)
    assert "attention_mask" not in seqs
    loader = data.train_dataloader()
    got = list(loader)
    assert len(loader) == len(got) == 3 and [b["input_ids"].shape[0] for b in got] == [2, 2, 1]
    assert sorted(rows(got)) == sorted(bytes(r.tolist()) for r in expected)  # a shuffle of the same windows
    assert data.record["sequences"] == 5 and data.record["tokens"] == 20 and data.record["world_size"] == 1


def test_jsonl_and_parquet_load(tmp_path):
    texts = ["first document", "second one", "the third"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    pq.write_table(pa.table({"body": texts}), tmp_path / "d.parquet")
    expected = cut(b"".join(t.encode() + b"\n\n" for t in texts), 8)
    for name in ("d.jsonl", "d.parquet"):
        seqs = dm(tmp_path / name, tmp_path, text_field="body", seq_len=8).sequences()
        assert torch.equal(seqs["input_ids"], expected), name
    with pytest.raises(ValueError, match="text_field"):
        dm(tmp_path / "d.jsonl", tmp_path, seq_len=8).sequences()  # default text_field="text" is not a column


def test_stdlib_matches_the_core_corpus_and_windows_are_seeded(tmp_path):
    kw = dict(max_bytes=200_000, seq_len=32, num_samples=16, calibration_samples=8, mode="windows", val_samples=5)
    a, b, c = TextDataModule(**kw), TextDataModule(**kw), TextDataModule(**{**kw, "seed": 1})
    train = stdlib_bytes("train", max_bytes=200_000)
    seqs = a.sequences("train")["input_ids"]
    assert seqs.shape == (16, 32)
    assert torch.equal(seqs, windows(train, 32, 16, seed=0))  # the papers' N x L protocol, as pruning.text draws it
    assert torch.equal(seqs, b.sequences("train")["input_ids"])
    assert not torch.equal(seqs, c.sequences("train")["input_ids"])
    # held-out: non-overlapping windows of the held-out files from their start; calibration: seeded windows
    assert torch.equal(a.sequences("val")["input_ids"], windows(stdlib_bytes("heldout", max_bytes=160), 32, 5))
    calib = a.calibration_batches(batch_size=4)
    assert [x.shape for x in calib] == [(4, 32), (4, 32)]
    assert torch.equal(torch.cat(calib), windows(train, 32, 8, seed=0))
    assert [b["input_ids"].shape for b in a.calibration_dataloader()] == [(1, 32)] * 8
    from pruning.pipeline.oneshot import calibration_fingerprint

    assert a.record["calibration"]["sha256"] == calibration_fingerprint(calib)["sha256"]


def test_instruct_labels_mask_the_prompt(tmp_path):
    examples = [{"instruction": "Add", "input": "1 2", "output": "3"}, {"instruction": "Greet", "output": "Hello"}]
    (tmp_path / "alpaca.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    prompts = [alpaca_prompt("Add", "1 2"), alpaca_prompt("Greet")]
    assert prompts[0].startswith("Below is an instruction that describes a task, paired with an input")
    assert prompts[1].startswith("Below is an instruction that describes a task. Write a response")
    assert prompts[1].endswith("### Instruction:\nGreet\n\n### Response:")
    responses = ["3\n\n", "Hello\n\n"]  # output + EOS (the bytes tokenizer's separator)
    seqs = dm(tmp_path / "alpaca.jsonl", tmp_path, mode="instruct", seq_len=256).sequences()
    assert seqs["input_ids"].shape == (2, 256)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        p, r = len(prompt), len(response)
        ids, labels, mask = seqs["input_ids"][row], seqs["labels"][row], seqs["attention_mask"][row]
        assert bytes(ids[: p + r].tolist()) == (prompt + response).encode()
        assert (labels[:p] == IGNORE_INDEX).all()  # prompt: no loss
        assert bytes(labels[p : p + r].tolist()) == response.encode()  # response: labelled
        assert (labels[p + r :] == IGNORE_INDEX).all() and (ids[p + r :] == 0).all()  # padding
        assert (mask[: p + r] == 1).all() and (mask[p + r :] == 0).all()
    # other column names: "response" is taken for "output" (LaMini), any others are mapped by instruct_fields
    (tmp_path / "lamini.jsonl").write_text(json.dumps({"instruction": "Greet", "response": "Hello"}) + "\n")
    (tmp_path / "qa.jsonl").write_text(json.dumps({"q": "Greet", "a": "Hello"}) + "\n")
    for name, fields in (("lamini.jsonl", None), ("qa.jsonl", {"instruction": "q", "output": "a"})):
        other = dm(tmp_path / name, tmp_path, mode="instruct", seq_len=256, instruct_fields=fields).sequences()
        assert torch.equal(other["labels"][0], seqs["labels"][1]), name
    with pytest.raises(ValueError, match="instruct_fields"):
        dm(tmp_path / "qa.jsonl", tmp_path, mode="instruct", seq_len=256).sequences()
    # packed instead of padded: the two examples back to back, no attention mask, the same labels
    packed = dm(tmp_path / "alpaca.jsonl", tmp_path, mode="instruct", instruct_packing=True, seq_len=16).sequences()
    text = (prompts[0] + responses[0] + prompts[1] + responses[1]).encode()
    assert torch.equal(packed["input_ids"], cut(text, 16)) and "attention_mask" not in packed
    label_stream = (
        [IGNORE_INDEX] * len(prompts[0]) + list(b"3\n\n") + [IGNORE_INDEX] * len(prompts[1]) + list(b"Hello\n\n")
    )
    n = len(text) // 16
    assert packed["labels"].flatten().tolist() == label_stream[: n * 16]


def test_hub_style_tokenizer_adds_bos_and_eos(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, "hello": 3, "world": 4, "again": 5}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(tmp_path / "tok")
    (tmp_path / "t.txt").write_text("hello world hello")
    (tmp_path / "u.txt").write_text("again")
    kw = dict(seq_len=4, add_bos=True)
    seqs = dm(tmp_path / "*.txt", tmp_path, tokenizer=str(tmp_path / "tok"), **kw).sequences()
    assert seqs["input_ids"].flatten().tolist() == [0, 3, 4, 3, 1, 0, 5, 1]  # [BOS] doc [EOS] [BOS] doc [EOS]
    # tokenizer="model": the LightningModule's tokenizer, looked up in setup
    data = dm(tmp_path / "*.txt", tmp_path, tokenizer="model", **kw)
    data.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=tok), global_rank=0, world_size=1)
    assert torch.equal(data.sequences()["input_ids"], seqs["input_ids"]) and data.tokenizer is tok


# --------------------------------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("world", [2, 3])
def test_rank_shards_are_disjoint_and_equal(tmp_path, world):
    source = numbered(tmp_path / "n.txt", 101)  # 101 sequences: unequal shares for 2 and 3 ranks
    per_rank, seen = 101 // world, []
    for rank in range(world):
        lengths = set()
        for workers in (0, 2) if rank == world - 1 else (0,):
            data = dm(source, tmp_path, seq_len=8, batch_size=4, num_workers=workers)
            data.set_rank(rank, world)
            loader = data.train_dataloader()
            epoch0 = list(loader)
            epoch1 = list(loader)  # the next epoch: a new order of the same shard
            lengths.add((len(loader), len(epoch0), len(epoch1)))
            if workers == 0:
                reference = epoch0, epoch1
            else:  # workers get whole batches: the same batches, in the same order, none twice
                assert rows(epoch0) == rows(reference[0]) and rows(epoch1) == rows(reference[1])
        assert lengths == {(-(-per_rank // 4),) * 3}
        shard = rows(reference[0])
        assert len(shard) == len(set(shard)) == per_rank and sorted(shard) == sorted(rows(reference[1]))
        assert rows(reference[0]) != rows(reference[1])
        assert data.record["sequences"] == per_rank and data.record["world_size"] == world
        seen += shard
    assert len(seen) == len(set(seen)) == per_rank * world  # disjoint across ranks


def test_streaming_ranks_yield_exactly_steps_per_epoch_and_resume(tmp_path):
    (tmp_path / "s").mkdir()
    for k in range(4):  # 4 files x 10 lines; with sample_by="line" every line is a document
        numbered(tmp_path / "s" / f"{k}.txt", 10, start=10 * k)
    kw = dict(streaming=True, steps_per_epoch=3, sample_by="line", seq_len=9, batch_size=2, num_workers=2)
    shards = []
    for rank in range(2):
        data = dm(tmp_path / "s", tmp_path, **kw)
        data.set_rank(rank, 2)
        loader = data.train_dataloader()
        batches = list(loader)
        assert len(loader) == len(batches) == 3 and all(b["input_ids"].shape == (2, 9) for b in batches)
        shards.append(rows(batches))
        if rank == 0:  # stop after one batch, resume in a fresh loader: the same remaining two batches
            state = loader.state_dict()
            assert state["epoch"] == 1 and state["consumed"] == 0
            again = data.train_dataloader()
            first = next(iter(again))
            resumed = dm(tmp_path / "s", tmp_path, **kw)
            resumed.set_rank(0, 2)
            rest = resumed.train_dataloader()
            rest.load_state_dict(again.state_dict())
            assert rows([first] + list(rest)) == shards[0]
    assert not set(shards[0]) & set(shards[1])  # documents are dealt to disjoint streams


# --------------------------------------------------------------------------------------------------- resume


class Recorder(LightningModule):
    """Records the batches it trains on."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"].clone())
        return (self.w * batch["input_ids"].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit(steps: int, data: TextDataModule, ckpt_in=None, ckpt_out=None) -> list[torch.Tensor]:
    module = Recorder()
    trainer = Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_in)
    if ckpt_out is not None:
        trainer.save_checkpoint(ckpt_out)
    return module.seen


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("k,workers", [(7, 0), (11, 0), (15, 0), (15, 2)])
def test_resume_mid_epoch_sees_the_same_batches(tmp_path, k, workers):
    source = numbered(tmp_path / "n.txt", 41)  # 41 sequences, batches of 4: 11 batches per epoch (last one short)
    make = lambda: dm(source, tmp_path, seq_len=8, batch_size=4, num_workers=workers)
    full = fit(25, make())  # 2 epochs and 3 batches, uninterrupted
    first = fit(k, make(), ckpt_out=tmp_path / "k.ckpt")  # k=7, 15: mid-epoch; k=11: exactly at the epoch's end
    rest = fit(25, make(), ckpt_in=tmp_path / "k.ckpt")
    assert len(first) == k and len(rest) == 25 - k
    assert all(torch.equal(a, b) for a, b in zip(first + rest, full))
    assert rows([{"input_ids": b} for b in full[:11]]) != rows([{"input_ids": b} for b in full[11:22]])


def test_resume_refuses_other_data(tmp_path):
    data = dm(numbered(tmp_path / "n.txt", 41), tmp_path, seq_len=8, batch_size=4)
    loader = data.train_dataloader()
    next(iter(loader))
    state = loader.state_dict()
    other = dm(numbered(tmp_path / "m.txt", 41, start=1), tmp_path, seq_len=8, batch_size=4)
    with pytest.raises(ValueError, match="HINT"):
        other.train_dataloader().load_state_dict(state)


# --------------------------------------------------------------------------------------------------- record, errors


def test_record_sha256_is_stable_and_tracks_the_data(tmp_path):
    source = numbered(tmp_path / "n.txt", 41)
    a, b = (dm(source, tmp_path, seq_len=8).fingerprint() for _ in range(2))
    assert a == b and len(a) == 64
    numbered(source, 41, start=1)
    assert dm(source, tmp_path, seq_len=8).fingerprint() != a
    ranks = []
    for rank in range(2):
        data = dm(source, tmp_path, seq_len=8)
        data.set_rank(rank, 2)
        data.setup("fit")
        ranks.append(data.record)
    assert ranks[0]["sha256"] != ranks[1]["sha256"] and ranks[0]["sha256_all"] == ranks[1]["sha256_all"]
    assert {"source", "split", "mode", "seq_len", "seed", "sequences", "tokens", "world_size"} <= set(ranks[0])


@pytest.mark.parametrize(
    "kwargs,key",
    [
        (dict(mode="bogus"), "mode"),
        (dict(seq_len=1), "seq_len"),
        (dict(batch_size=0), "batch_size"),
        (dict(source="./no/such/file.txt"), "source"),
        (dict(train_split="validation"), "train_split"),
        (dict(instruct_fields={"answer": "a"}), "instruct_fields"),
        (dict(add_bos=True), "add_bos"),
        (dict(mode="instruct"), "mode"),
        (dict(max_bytes=0), "max_bytes"),
    ],
)
def test_bad_arguments_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=rf"{key}=.*HINT: .*{key}") as err:
        TextDataModule(**kwargs)
    if key in kwargs:
        assert repr(kwargs[key]) in str(err.value)  # the bad value is shown


def test_streaming_needs_a_length():
    with pytest.raises(ValueError, match=r"steps_per_epoch=None.*HINT: .*steps_per_epoch"):
        TextDataModule(streaming=True).setup("fit")  # no steps_per_epoch and no trainer.max_steps to take it from
