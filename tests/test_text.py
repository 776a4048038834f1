"""The one reader of text (``pruning.text.TextReader``): the DataModule, the perplexity protocol and the search / rank
command lines read the same documents from the same sources, and fail with the same messages."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from pruning.datamodules import TextDataModule
from pruning.evaluation.perplexity import PerplexityProtocol, load_documents
from pruning.text import SourceNotFoundError, TextReader, source_kind
from pruning.text.stdlib import stdlib_bytes, stdlib_files

TEXTS = ["first document", "", "second one", None, "the third"]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
    return path


def test_one_reader_for_the_datamodule_and_the_protocol(jsonl, tmp_path):
    # the protocol keeps empty and null texts (each still adds a joiner), the DataModule skips them when asked to
    # (a null text is refused by default: see tests/test_startup_checks.py)
    want = ["first document", "", "second one", "", "the third"]
    assert load_documents(PerplexityProtocol(source=str(jsonl))) == want
    reader = TextReader(str(jsonl), missing_text="skip")
    assert list(reader.documents()) == ["first document", "second one", "the third"] and reader.skipped == 1
    data = TextDataModule(
        source=str(jsonl), seq_len=4, val_samples=0, cache_dir=str(tmp_path / "c"), missing_text="skip"
    )
    stream = b"first document\n\nsecond one\n\nthe third\n\n"
    assert bytes(data.sequences()["input_ids"].flatten().tolist()) == stream[: len(stream) // 4 * 4]
    # stdlib: one bytes document per file of the split, for both
    heldout = load_documents(PerplexityProtocol.preset("stdlib"))
    assert heldout == [f.read_bytes() for f in stdlib_files("heldout")]
    assert b"".join(d + b"\n\n" for d in TextReader("stdlib", "train").documents(max_bytes=50_000))[:50_000] == bytes(
        stdlib_bytes("train", max_bytes=50_000).tolist()
    )


def test_directories_globs_and_lists(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("bee")
    (tmp_path / "d" / "sub" / "a.md").write_text("ay")
    (tmp_path / "d" / "notes.rst").write_text("skipped: not a text suffix")
    assert source_kind(str(tmp_path / "d")) == "local" and source_kind("wikitext") == "hub"
    assert list(TextReader(str(tmp_path / "d")).documents()) == ["bee", "ay"]  # sorted paths: d/b.txt < d/sub/a.md
    assert list(TextReader(str(tmp_path / "d" / "**" / "*.md")).documents()) == ["ay"]
    # a list keeps its order; builder="text" reads any suffix as text
    files = [str(tmp_path / "d" / "notes.rst"), str(tmp_path / "d" / "b.txt")]
    assert list(TextReader(files, builder="text").documents()) == ["skipped: not a text suffix", "bee"]
    # the perplexity protocol reads directories too
    assert load_documents(PerplexityProtocol(source=str(tmp_path / "d"))) == ["bee", "ay"]


def test_errors_name_the_owner_the_value_and_a_hint(jsonl, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"perplexity: source='./missing.jsonl'.*HINT: no file matches"):
        load_documents(PerplexityProtocol(source="./missing.jsonl"))
    with pytest.raises(ValueError, match=rf"relative to {tmp_path}"):  # the same error is a ValueError too
        TextDataModule(source="./missing.jsonl")
    assert issubclass(SourceNotFoundError, ValueError)
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"perplexity: source=.*table\.csv.*HINT: .*table\.csv'\] are none of these"):
        load_documents(PerplexityProtocol(source=str(tmp_path / "table.csv")))
    with pytest.raises(ValueError, match=r"perplexity: text_field='body'.*\['id', 'text'\]"):
        load_documents(PerplexityProtocol(source=str(jsonl), text_field="body"))
    with pytest.raises(ValueError, match=r"perplexity: split='test'.*\['train', 'heldout'\].*HINT"):
        load_documents(PerplexityProtocol(source="stdlib"))


def test_search_reads_text_files_in_order_with_undecodable_bytes_replaced(tmp_path):
    from pruning.commands.search import load_data
    from pruning.evaluation.harness import byte_tokenizer

    byte_tokenizer().save_pretrained(tmp_path / "tok")
    (tmp_path / "b.txt").write_bytes(b"bravo \xff" * 40)
    (tmp_path / "a.txt").write_text("alpha " * 40)
    args = argparse.Namespace(
        text=[str(tmp_path / "b.txt"), str(tmp_path / "a.txt")],
        tokenizer=str(tmp_path / "tok"),
        seq_len=8,
        calibration=2,
        heldout=2,
        batch_size=2,
        seed=0,
    )
    calib, held = load_data(args, model=None)
    text = ("bravo \ufffd" * 40 + "\n\n" + "alpha " * 40).encode()
    ids = torch.tensor(list(text))
    cut = int(ids.numel() * 0.9)
    from pruning.text.stdlib import windows

    assert torch.equal(torch.cat(calib), windows(ids[:cut], 8, 2, seed=0))
    assert torch.equal(torch.cat(held), windows(ids[cut:], 8, 2, seed=1))
    args.text = [str(tmp_path / "missing.txt")]
    with pytest.raises(FileNotFoundError, match=r"--text=.*missing\.txt"):
        load_data(args, model=None)


# ---------------------------------------------------------------------------------------------------- tokens
def _bpe_tokenizer():
    """A small trained BPE tokenizer that adds BOS by itself (like Llama's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<unk>"], show_progress=False)
    core.train_from_iterator(["def add(a, b):\n    return a + b\n"] * 20, trainer)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_one_encoding_for_bytes_and_tokenizers():
    from pruning.evaluation.harness import byte_tokenizer as reexported
    from pruning.text.tokens import Encoder, byte_tokenizer, encode, joined_ids, packed_stream

    assert reexported is byte_tokenizer
    docs = ["def add(a, b):", "", "    return a + b  # é"]
    text = "\n\n".join(docs)
    # the bytes scheme: UTF-8 bytes, the same ids as the byte tokenizer object
    assert joined_ids(docs).tolist() == list(text.encode()) == byte_tokenizer()(text)["input_ids"]
    assert joined_ids([d.encode() for d in docs], "bytes", bos_id=7).tolist() == [7, *text.encode()]
    # a Hugging Face tokenizer: the joined text tokenised once, special tokens only when asked for
    tok = _bpe_tokenizer()
    assert joined_ids(docs, tok).tolist() == tok(text, add_special_tokens=False)["input_ids"]
    assert joined_ids(docs, tok, special_tokens=True).tolist() == tok(text)["input_ids"]
    assert tok(text)["input_ids"][0] == tok.bos_token_id
    # training documents: bos + ids + eos each (bytes: the "\n\n" separator), packed and cut
    assert [a.tolist() for a in encode(docs[:1], tok)] == [tok(docs[0], add_special_tokens=False)["input_ids"]]
    framed = Encoder(tok).documents(docs[:1])[0].tolist()
    assert framed == [tok.bos_token_id, *encode(docs[:1], tok)[0].tolist(), tok.eos_token_id]
    assert packed_stream(docs, Encoder(), 20).tolist() == list(("".join(d + "\n\n" for d in docs)).encode()[:20])
    with pytest.raises(ValueError, match=r"Encoder: add_bos=True.*HINT: the bytes tokenizer has no BOS"):
        Encoder(None, add_bos=True)
