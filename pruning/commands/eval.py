"""``pruning eval``: perplexity and lm-eval numbers of any export, hub model or Lightning checkpoint, as a table.

Examples::

    pruning eval .cache/demo-pruned --perplexity stdlib --tasks stdlib_mc           # offline
    pruning eval out/pruned --perplexity wikitext --tasks boolq piqa hellaswag winogrande arc_easy arc_challenge \\
        openbookqa --json out/pruned-eval.json                                       # the papers' numbers (online)
    pruning eval runs/last.ckpt --perplexity stdlib                                  # a Lightning checkpoint

The model is evaluated where it was loaded (in memory; lm-eval wraps the object, nothing is written besides
``--json``). Exports load with :func:`pruning.load_pretrained` (stock and per-layer exports alike); ``.ckpt`` files with
:meth:`pruning.lightning.DistillationModule.load_from_checkpoint` (the student, masks already in its weights), unpickled
with ``weights_only=True``; anything else is a hub name for ``AutoModelForCausalLM.from_pretrained`` (safetensors
only unless ``--allow-pickle``).
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path
from typing import Any

import torch

from ..loading import PickleRefused, from_pretrained, refused_checkpoint

__all__ = ["load_for_eval", "main"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _tokenizer_from(path: str, model, name: str | None) -> Any:
    """``--tokenizer`` if given; else the one saved with the model; else the byte tokenizer for vocab 256."""
    from transformers import AutoTokenizer

    if name == "bytes":
        return None
    if name is not None:
        return AutoTokenizer.from_pretrained(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError):
        if getattr(model.config, "vocab_size", None) == 256:
            return None  # byte-level model without tokenizer files (the demo model)
        raise SystemExit(
            f"pruning eval: no tokenizer found with {path!r} and the model is not byte-level. "
            "HINT: --tokenizer NAME_OR_PATH"
        ) from None


def load_for_eval(
    target: str,
    dtype: str | None = None,
    tokenizer: str | None = None,
    attn_implementation: str | None = None,
    allow_pickle: bool = False,
) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, tokenizer or None for bytes, info)`` for an export directory, a ``.ckpt`` or a hub name. Nothing
    loaded runs code: checkpoints are unpickled with ``weights_only=True``, models read from safetensors only
    (``allow_pickle`` admits ``pytorch_model.bin``)."""
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = DTYPES[dtype]
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    path = Path(target).expanduser()
    if path.suffix == ".ckpt":
        from ..lightning.module import DistillationModule

        try:
            module = DistillationModule.load_from_checkpoint(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:  # a payload, or classes that are not plain data: never unpickled
            raise refused_checkpoint(path, err) from err
        merge = getattr(module, "merge_lora", None)
        if callable(merge):
            merge()
        model = module.student
        if dtype is not None:
            model.to(DTYPES[dtype])
        tok = module.tokenizer if tokenizer is None else (None if tokenizer == "bytes" else tokenizer)
        if tok is None and tokenizer is None and getattr(model.config, "vocab_size", None) != 256:
            raise SystemExit("pruning eval: the checkpoint's module has no tokenizer. HINT: --tokenizer NAME_OR_PATH")
        if isinstance(tok, str):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(tok)
        return model.eval(), tok, {"kind": "lightning_checkpoint", "path": str(path.resolve())}
    if path.is_dir():
        from ..surgery import load_pretrained

        model = load_pretrained(path, allow_pickle=allow_pickle, **kwargs)
        manifest = path / "pruning_manifest.json"
        info = {"kind": "export", "path": str(path.resolve())}
        if manifest.is_file():
            info["manifest"] = json.loads(manifest.read_text())
        return model.eval(), _tokenizer_from(str(path), model, tokenizer), info
    if path.exists():
        raise SystemExit(f"pruning eval: {target!r} is neither an export directory nor a .ckpt file")
    model = from_pretrained(target, allow_pickle=allow_pickle, key="model", **kwargs)
    return model.eval(), _tokenizer_from(target, model, tokenizer), {"kind": "hub", "name": target}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="pruning eval", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("model", help="export directory, Lightning .ckpt, or hub name")
    ap.add_argument(
        "--perplexity",
        default=None,
        metavar="PROTOCOL",
        help="'wikitext' (the papers' WikiText-2 protocol), 'stdlib' (offline, held-out stdlib), a local "
        ".txt/.jsonl/.json/.parquet file or glob, or a hub dataset name",
    )
    ap.add_argument("--dataset-config", default=None, help="hub dataset configuration (e.g. wikitext-2-raw-v1)")
    ap.add_argument("--split", default=None, help="split of the perplexity source (hub: test; stdlib: heldout)")
    ap.add_argument("--text-field", default=None, help="text column (default: text)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per window (wikitext: 2048, stdlib: 128)")
    ap.add_argument("--stride", type=int, default=None, help="tokens between windows (default: non-overlapping)")
    ap.add_argument("--add-bos", default=None, choices=["none", "stream", "window"], help="BOS handling")
    ap.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    ap.add_argument(
        "--tasks",
        nargs="*",
        default=None,
        metavar="TASK",
        help="lm-eval tasks, e.g. stdlib_mc (offline) or 'suite' for boolq piqa hellaswag winogrande "
        "arc_easy arc_challenge openbookqa",
    )
    ap.add_argument("--limit", type=float, default=None, help="at most N documents per task (smoke runs)")
    ap.add_argument("--num-fewshot", type=int, default=None)
    ap.add_argument("--include-path", nargs="*", default=None, help="extra directories of lm-eval task YAMLs")
    ap.add_argument(
        "--metrics",
        choices=["paper", "all"],
        default="paper",
        help="one row per task with the papers' metric, or every metric",
    )
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: cuda if available)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="load in this dtype")
    ap.add_argument("--attn-implementation", default=None, help="e.g. sdpa, eager")
    ap.add_argument("--tokenizer", default=None, help="tokenizer name or path, or 'bytes' (default: the model's)")
    ap.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also load weights stored as pickles (pytorch_model.bin), which can run code: only files you trust",
    )
    ap.add_argument("--json", dest="json_path", default=None, help="write the results as JSON here")
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    if args.perplexity is None and not args.tasks:
        raise SystemExit("pruning eval: nothing to do. HINT: --perplexity stdlib|wikitext|FILE and/or --tasks ...")
    from ..evaluation.harness import DEFAULT_TASKS, evaluate_tasks, markdown_table
    from ..evaluation.perplexity import PerplexityProtocol, evaluate_perplexity
    from ..text.tokens import byte_tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, tok, info = load_for_eval(
            args.model, args.dtype, args.tokenizer, args.attn_implementation, args.allow_pickle
        )
    except PickleRefused as err:
        raise SystemExit(f"pruning eval: {err}") from None
    model.to(device)
    out: dict[str, Any] = {"model": info}
    if args.perplexity is not None:
        overrides = {
            k: v
            for k, v in dict(
                dataset_config=args.dataset_config,
                split=args.split,
                text_field=args.text_field,
                seq_len=args.seq_len,
                stride=args.stride,
                add_bos=args.add_bos,
                max_windows=args.max_windows,
            ).items()
            if v is not None
        }
        protocol = PerplexityProtocol.preset(args.perplexity, **overrides)
        res = evaluate_perplexity(model, "bytes" if tok is None else tok, protocol, args.batch_size, device)
        out["perplexity"] = res.as_dict()
        p = res.protocol
        print(
            f"perplexity {res.ppl:.4f}  ({res.tokens:,} tokens in {res.windows} windows; source {p['source']}"
            f"{'/' + p['split'] if p['split'] else ''}, seq_len {p['seq_len']}, stride {p['stride']}, "
            f"bos {p['add_bos']}, tokenizer {res.tokenizer})",
            flush=True,
        )
    if args.tasks:
        tasks = [t for name in args.tasks for t in (DEFAULT_TASKS if name == "suite" else [name])]
        limit = args.limit
        if limit is not None and limit >= 1:
            limit = int(limit)
        harness = evaluate_tasks(
            model,
            byte_tokenizer() if tok is None else tok,
            tasks,
            limit=limit,
            num_fewshot=args.num_fewshot,
            batch_size=args.batch_size,
            include_path=args.include_path,
            metrics=args.metrics,
        )
        out["lm_eval"] = harness.as_dict()
        print("\n" + markdown_table(harness.rows), flush=True)
    if args.json_path:
        path = Path(args.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(out, indent=2, default=str))
        tmp.replace(path)
        print(f"wrote {path}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
