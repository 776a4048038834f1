"""The reference model of the quality benchmark: a Llama-family model that has learned something, trained offline.

Tiny random models prove that code runs; comparing criteria needs a model whose weights carry knowledge. This
script trains one on the bundled corpus (the Python standard library's source, :mod:`pruning.text`: files split
into train and held-out *by file*):

1. a byte-level BPE tokenizer (``tokenizers``) trained on the **train split only**, wrapped as a
   ``transformers.PreTrainedTokenizerFast`` (``<|endoftext|>`` is BOS/EOS; no BOS is used in training or scoring);
2. both splits tokenised once as the perplexity protocol does (files joined with ``"\\n\\n"``, one stream per split,
   :func:`pruning.evaluation.token_stream`), cached as ``uint16`` arrays;
3. a Llama with grouped-query attention (GQA), tied embeddings, fp32, trained with AdamW on seeded random windows
   of the train stream (warm-up, cosine decay to 10 %, gradient clipping 1.0; :func:`pruning.training.train`);
4. held-out perplexity on evenly spaced non-overlapping windows of the held-out stream (:func:`heldout_windows`).

Everything is cached under ``.cache/reference-model/<preset>/`` (``model.safetensors``, the tokenizer files, the token
streams) with ``manifest.json``: the config, the tokenizer's sha256, steps, tokens seen, final held-out perplexity
and its protocol, time per stage, seed, the corpus sha256, versions. A later call with the same settings (same
``key`` in the manifest) reuses it.

    .venv/bin/python benchmarks/reference_model.py                   # preset cpu: 11.3M params, ~25 min on 2 cores
    .venv/bin/python benchmarks/reference_model.py --preset gpu --device cuda   # ~60M params, bigger run
    .venv/bin/python benchmarks/reference_model.py --preset tiny     # seconds: what the tests use

Presets (``--steps`` and ``--batch`` override): ``tiny`` (tests), ``cpu`` (the default; hidden 384, 6 layers,
8 query heads / 4 KV heads, MLP 1024, vocab 4096, 11.3M parameters of which 1.6M in the tied embedding; 1000 steps
of 16 × 256 tokens = 4.1M tokens, 1.2 epochs of the train split; about 3,000 tokens/s on 2 quiet cores, i.e. ~23
minutes, 35 minutes when measured here on cores shared with other jobs; held-out perplexity 35.1 per BPE token),
``gpu`` (hidden 768, 12 layers, 12 / 4 heads, MLP 2048, vocab 8192, 4000 steps of 32 × 512 tokens; bf16 autocast
on CUDA).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pruning.evaluation.perplexity import IGNORE_INDEX, PerplexityProtocol, score_windows, token_stream  # noqa: E402
from pruning.text.stdlib import stdlib_files, stdlib_root  # noqa: E402
from pruning.training import RandomWindows, TrainConfig, train  # noqa: E402

SPECIAL = "<|endoftext|>"
DEFAULT_CACHE = Path(".cache/reference-model")


@dataclass(frozen=True)
class Preset:
    """Everything that defines the reference model (the cache key is this plus the corpus' sha256)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    seq_len: int
    batch: int
    steps: int
    lr: float
    warmup: float = 0.05  # fraction of the steps
    min_lr: float = 0.1  # final LR as a fraction of lr (cosine)
    weight_decay: float = 0.1
    tie_embeddings: bool = True
    eval_windows: int = 128  # held-out windows of seq_len tokens for the manifest's perplexity
    max_train_bytes: int | None = None  # corpus cut (tests): tokenizer and training text
    max_heldout_bytes: int | None = None
    seed: int = 0


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        vocab_size=320,
        hidden_size=64,
        num_layers=2,
        num_heads=8,
        num_kv_heads=4,
        intermediate_size=128,
        seq_len=64,
        batch=8,
        steps=30,
        lr=3e-3,
        eval_windows=8,
        max_train_bytes=150_000,
        max_heldout_bytes=40_000,
    ),
    "cpu": Preset(
        vocab_size=4096,
        hidden_size=384,
        num_layers=6,
        num_heads=8,
        num_kv_heads=4,
        intermediate_size=1024,
        seq_len=256,
        batch=16,
        steps=1000,
        lr=2e-3,
        eval_windows=128,
    ),
    "gpu": Preset(
        vocab_size=8192,
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        num_kv_heads=4,
        intermediate_size=2048,
        seq_len=512,
        batch=32,
        steps=4000,
        lr=1e-3,
        eval_windows=256,
    ),
}


# ---------------------------------------------------------------------------------------------- corpus
def _docs(split: str, max_bytes: int | None) -> list[bytes]:
    out, total = [], 0
    for p in stdlib_files(split):  # type: ignore[arg-type]
        if max_bytes is not None and total >= max_bytes:
            break
        b = p.read_bytes()
        out.append(b)
        total += len(b)
    return out


def corpus_sha256(max_train_bytes: int | None = None, max_heldout_bytes: int | None = None) -> str:
    """sha256 over the relative path and bytes of every file of both splits (as cut), in order."""
    h = hashlib.sha256()
    root = stdlib_root()
    for split, cut in (("train", max_train_bytes), ("heldout", max_heldout_bytes)):
        h.update(split.encode())
        total = 0
        for p in stdlib_files(split):  # type: ignore[arg-type]
            if cut is not None and total >= cut:
                break
            b = p.read_bytes()
            total += len(b)
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + hashlib.sha256(b).digest())
    return h.hexdigest()


def train_tokenizer(docs: list[bytes], vocab_size: int):
    """Byte-level BPE trained on ``docs`` (deterministic for the same input), as a ``PreTrainedTokenizerFast``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((d.decode("utf-8", errors="replace") for d in docs), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL, model_max_length=1 << 30)


def tokenizer_sha256(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def encode_split(tokenizer, docs: list[bytes]) -> torch.Tensor:
    """The split's token stream as the perplexity protocol builds it (joined with ``"\\n\\n"``, no special tokens)."""
    protocol = PerplexityProtocol(source="stdlib", split="heldout", seq_len=2)  # only joiner/add_bos are used
    return token_stream(protocol, tokenizer, documents=docs)


# ---------------------------------------------------------------------------------------------- evaluation
def heldout_windows(stream: torch.Tensor, n: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` non-overlapping windows of ``seq_len`` tokens at evenly spaced offsets ``round(i·(T−L)/(n−1))`` over
    the whole held-out stream (every part of the split represented, not just its first files); ``(inputs, labels)``
    with the first position unscored (nothing precedes it inside the window)."""
    T = stream.numel()
    if T < n * seq_len:
        n = max(1, T // seq_len)
    starts = torch.linspace(0, T - seq_len, n).round().long() if n > 1 else torch.zeros(1, dtype=torch.long)
    inputs = stream[starts[:, None] + torch.arange(seq_len)[None, :]]
    labels = inputs.clone()
    labels[:, 0] = IGNORE_INDEX
    return inputs, labels


def window_protocol(n: int, seq_len: int, stream_tokens: int, tokenizer_sha: str) -> dict:
    return {
        "source": "stdlib",
        "split": "heldout",
        "joiner": "\\n\\n",
        "add_bos": "none",
        "seq_len": seq_len,
        "windows": n,
        "placement": "evenly spaced over the held-out stream, non-overlapping",
        "scored_tokens": n * (seq_len - 1),
        "stream_tokens": stream_tokens,
        "tokenizer_sha256": tokenizer_sha,
        "ppl": "exp(sum NLL / scored tokens), fp32 logits, fp64 sums (pruning.evaluation.score_windows)",
    }


def heldout_ppl(model, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 16, device=None) -> float:
    was = model.training
    model.eval()
    try:
        nll, tokens = score_windows(model, inputs, labels, batch_size=batch_size, device=device)
    finally:
        model.train(was)
    return math.exp(nll / tokens)


# ---------------------------------------------------------------------------------------------- model
def build_config(p: Preset, vocab_size: int):
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_layers,
        num_attention_heads=p.num_heads,
        num_key_value_heads=p.num_kv_heads,
        max_position_embeddings=max(p.seq_len, 512),
        tie_word_embeddings=p.tie_embeddings,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=None,
    )
    cfg._attn_implementation = "sdpa"
    return cfg


def train_config(p: Preset, device: torch.device) -> TrainConfig:
    """The preset's training: AdamW (β 0.9/0.95, no decay on 1-D weights), warm-up then cosine to ``min_lr``,
    clipping 1.0, bf16 autocast on CUDA, about 20 progress lines."""
    return TrainConfig(
        steps=p.steps,
        lr=p.lr,
        weight_decay=p.weight_decay,
        betas=(0.9, 0.95),
        decay_vectors=False,
        schedule="cosine",
        warmup=p.warmup,
        min_lr=p.min_lr,
        clip_grad_norm=1.0,
        autocast="bfloat16" if device.type == "cuda" else None,
        log_every=max(1, p.steps // 20),
    )


def train_model(
    p: Preset, train_ids: torch.Tensor, vocab_size: int, device: torch.device, log: Callable[[str], None] = print
) -> tuple[torch.nn.Module, list[float]]:
    """A fresh model of the preset trained on seeded random windows of ``train_ids``: ``(model, losses)``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(p.seed)
    model = AutoModelForCausalLM.from_config(build_config(p, vocab_size)).to(device)
    losses = train(model, RandomWindows(train_ids, p.seq_len, p.batch, seed=p.seed), train_config(p, device), log=log)
    return model.eval(), losses


# ---------------------------------------------------------------------------------------------- cache
@dataclass
class Reference:
    """A loaded reference model: model, tokenizer, token streams of both splits, manifest."""

    model: torch.nn.Module
    tokenizer: object
    train_ids: torch.Tensor
    heldout_ids: torch.Tensor
    manifest: dict
    path: Path


def _save_ids(path: Path, ids: torch.Tensor) -> None:
    np.save(path, ids.numpy().astype(np.uint16 if int(ids.max()) < 65536 else np.int32))


def _load_ids(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.load(path).astype(np.int64))


def cache_key(p: Preset, corpus: str) -> dict:
    return {"preset": asdict(p), "corpus_sha256": corpus}


def resolve_preset(name: str, steps: int | None = None, batch: int | None = None) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} must be one of {list(PRESETS)}")
    p = PRESETS[name]
    if steps is not None:
        p = replace(p, steps=steps)
    if batch is not None:
        p = replace(p, batch=batch)
    return p


def preset_and_name(preset: str, steps: int | None = None, batch: int | None = None) -> tuple[Preset, str]:
    """The preset with overrides, and its cache folder's name (``cpu``, or ``cpu-s1000-b16`` when overridden)."""
    p = resolve_preset(preset, steps, batch)
    return p, (preset if (steps, batch) == (None, None) else f"{preset}-s{p.steps}-b{p.batch}")


def load_or_train(
    preset: str | Preset = "cpu",
    cache: Path = DEFAULT_CACHE,
    device: str | None = None,
    force: bool = False,
    log=print,
    name: str | None = None,
) -> Reference:
    """The cached reference model of ``preset`` (trained first if the cache is missing or was made with other
    settings). ``cache/<name>/`` holds it (``name`` defaults to the preset's name)."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    p = resolve_preset(preset) if isinstance(preset, str) else preset
    name = name or (preset if isinstance(preset, str) else "custom")
    out = Path(cache) / name
    dev = torch.device(device or "cpu")
    corpus = corpus_sha256(p.max_train_bytes, p.max_heldout_bytes)
    key = cache_key(p, corpus)
    mpath = out / "manifest.json"
    if not force and mpath.exists():
        manifest = json.loads(mpath.read_text())
        if manifest.get("key") == key:
            log(f"reusing the cached reference model in {out} (held-out ppl {manifest['heldout_ppl']:.3f})")
            model = AutoModelForCausalLM.from_pretrained(out).eval()
            model.config._attn_implementation = "sdpa"
            return Reference(
                model.to(dev),
                PreTrainedTokenizerFast.from_pretrained(out),
                _load_ids(out / "train_ids.npy"),
                _load_ids(out / "heldout_ids.npy"),
                manifest,
                out,
            )
        log(f"the cache in {out} was made with other settings: retraining")
    times: dict[str, float] = {}
    t = time.time()
    train_docs = _docs("train", p.max_train_bytes)
    tokenizer = train_tokenizer(train_docs, p.vocab_size)
    times["tokenizer_s"] = time.time() - t
    t = time.time()
    train_ids = encode_split(tokenizer, train_docs)
    heldout_ids = encode_split(tokenizer, _docs("heldout", p.max_heldout_bytes))
    times["encode_s"] = time.time() - t
    tok_sha = tokenizer_sha256(tokenizer)
    log(
        f"tokenizer: vocab {len(tokenizer)}, sha256 {tok_sha[:16]}…; train {train_ids.numel():,} tokens, held-out "
        f"{heldout_ids.numel():,} tokens ({times['tokenizer_s'] + times['encode_s']:.0f}s)"
    )
    t = time.time()
    model, losses = train_model(p, train_ids, len(tokenizer), dev, log=log)
    times["train_s"] = time.time() - t
    t = time.time()
    inputs, labels = heldout_windows(heldout_ids, p.eval_windows, p.seq_len)
    ppl = heldout_ppl(model, inputs, labels, device=dev)
    times["eval_s"] = time.time() - t
    n_params = sum(q.numel() for q in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel()
    log(f"held-out ppl {ppl:.3f} on {inputs.shape[0]} windows of {p.seq_len} tokens; {n_params / 1e6:.2f}M params")
    out.mkdir(parents=True, exist_ok=True)
    model.cpu().save_pretrained(out)
    tokenizer.save_pretrained(out)
    _save_ids(out / "train_ids.npy", train_ids)
    _save_ids(out / "heldout_ids.npy", heldout_ids)
    manifest = {
        "key": key,
        "preset_name": name,
        "config": build_config(p, len(tokenizer)).to_dict(),
        "parameters": n_params,
        "parameters_without_embeddings": n_params - n_embed,
        "tokenizer": {
            "kind": "byte-level BPE (tokenizers), trained on the train split",
            "vocab": len(tokenizer),
            "sha256": tok_sha,
        },
        "corpus": {
            "source": "Python standard library source (pruning.text.stdlib_files), split by file",
            "sha256": corpus,
            "train_files": len(train_docs),
            "train_tokens": int(train_ids.numel()),
            "heldout_tokens": int(heldout_ids.numel()),
        },
        "steps": p.steps,
        "tokens_seen": p.steps * p.batch * p.seq_len,
        "epochs": p.steps * p.batch * p.seq_len / train_ids.numel(),
        "final_train_loss_mean_last_10": float(np.mean(losses[-10:])),
        "heldout_ppl": ppl,
        "heldout_protocol": window_protocol(int(inputs.shape[0]), p.seq_len, int(heldout_ids.numel()), tok_sha),
        "seed": p.seed,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "times": times,
        "versions": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "tokenizers": __import__("tokenizers").__version__,
            "python": platform.python_version(),
        },
    }
    mpath.write_text(json.dumps(manifest, indent=2) + "\n")
    model.to(dev)
    return Reference(model, tokenizer, train_ids, heldout_ids, manifest, out)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="cpu", choices=list(PRESETS))
    ap.add_argument("--steps", type=int, default=None, help="override the preset's training steps")
    ap.add_argument("--batch", type=int, default=None, help="override the preset's batch (sequences per step)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--force", action="store_true", help="retrain even if the cache matches")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    p, name = preset_and_name(args.preset, args.steps, args.batch)
    t0 = time.time()
    ref = load_or_train(p, args.cache, args.device, args.force, name=name)
    m = ref.manifest
    print(
        f"reference model: {ref.path}  ({m['parameters'] / 1e6:.2f}M parameters, {m['tokens_seen']:,} tokens seen, "
        f"held-out ppl {m['heldout_ppl']:.3f}; {time.time() - t0:.0f}s)"
    )
    return m


if __name__ == "__main__":
    main()
