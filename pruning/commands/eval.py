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

import json
import pickle
import sys
from pathlib import Path
from typing import Any

import torch

from ..loading import PickleRefused, from_pretrained, refused_checkpoint
from ..recipe import DTYPES, Evaluation, evaluation_lines, tokenizer_for
from .parsing import CommandParser, command_parser

__all__ = ["load_for_eval", "main"]


def _tokenizer_from(path: str, model, name: str | None) -> Any:
    """``--tokenizer`` if given; else the one saved with the model; else the byte tokenizer for vocab 256."""
    return tokenizer_for(path, model, name, owner="pruning eval")


# hyper-parameters of a user's LightningModule that usually name the Hugging Face model it trains
MODEL_KEYS = ("pretrained", "model_name_or_path", "pretrained_model_name_or_path", "model_name", "model_path",
              "base_model", "name_or_path", "model")  # fmt: skip


def _from_checkpoint(path: Path, base: str | None, tokenizer: str | None) -> tuple[Any, Any]:
    """The Hugging Face model (and tokenizer) of a Lightning checkpoint: a DistillationModule's student (adapters
    merged), or the model any LightningModule trains, found by its weights' prefix in the state dict and built from
    ``base`` (or a hyper-parameter naming the model) with the checkpoint's weights."""
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # a payload, or classes that are not plain data: never unpickled
        raise refused_checkpoint(path, err) from err
    hp = dict(ckpt.get("hyper_parameters") or {})
    if "teacher" in hp and ("pretrained" in hp or "config" in hp) and base is None:  # a DistillationModule
        from ..lightning.module import DistillationModule

        module = DistillationModule(**{k: v for k, v in hp.items() if not k.startswith("_")})
        module.load_state_dict(ckpt["state_dict"])
        module.merge_lora()
        model, tok = module.student, module.tokenizer
    else:
        source = base or next((hp[k] for k in MODEL_KEYS if isinstance(hp.get(k), str)), None)
        if source is None:
            raise SystemExit(
                f"pruning eval: {str(path)!r} is a checkpoint of a LightningModule whose hyper-parameters name no "
                f"model (looked for {list(MODEL_KEYS)}). HINT: --base PATH_OR_NAME, the Hugging Face model the module "
                "trains (its config is read from there, its weights from the checkpoint)"
            )
        model, tok = _model_in_state_dict(ckpt["state_dict"], source, str(path)), None
        tokenizer = tokenizer or source
    if tokenizer is not None:
        tok = None if tokenizer == "bytes" else tokenizer
    if tok is None and tokenizer is None and getattr(model.config, "vocab_size", None) != 256:
        raise SystemExit("pruning eval: the checkpoint's module has no tokenizer. HINT: --tokenizer NAME_OR_PATH")
    if isinstance(tok, str):
        tok = _tokenizer_from(tok, model, None)
    return model, tok


def _model_in_state_dict(state: dict[str, torch.Tensor], source: str, where: str):
    """A model of ``source``'s config holding the entries of ``state`` under the prefix where its weights are."""
    from transformers import AutoModelForCausalLM

    from ..surgery import read_config

    config = read_config(source) if Path(source).expanduser().is_dir() else _hub_config(source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    own = list(model.state_dict())
    anchor = own[0]
    prefixes = [k[: -len(anchor)] for k in state if k.endswith(anchor)]
    prefix = next((p for p in prefixes if all(p + k in state for k in own if "lm_head" not in k)), None)
    if prefix is None:
        raise SystemExit(
            f"pruning eval: {where!r} holds no weights of a {type(model).__name__} as {source!r} configures it "
            f"(no prefix P with P + {anchor!r} and the rest). HINT: --base the model the module trains"
        )
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    model.load_state_dict(weights, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    for name in missing:  # non-persistent buffers (rotary tables) are not in a state dict: built on the host
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        if attr in module._buffers:
            module._buffers[attr] = torch.empty_like(module._buffers[attr], device="cpu")
    if hasattr(model, "model") and hasattr(model.model, "rotary_emb"):
        model.model.rotary_emb.__init__(model.config)  # recompute the rotary frequencies on the host
    still = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still:
        raise SystemExit(f"pruning eval: {where!r} lacks weights for {still[:3]}")
    return model


def _hub_config(name: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name)


def load_for_eval(
    target: str,
    dtype: str | None = None,
    tokenizer: str | None = None,
    attn_implementation: str | None = None,
    allow_pickle: bool = False,
    base: str | None = None,
) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, tokenizer or None for bytes, info)`` for an export directory, a ``.ckpt`` (of a DistillationModule,
    or of any LightningModule: ``base`` names the model it trains, when its hyper-parameters do not) or a hub name.
    Nothing loaded runs code: checkpoints are unpickled with ``weights_only=True``, models read from safetensors only
    (``allow_pickle`` admits ``pytorch_model.bin``)."""
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = DTYPES[dtype]
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    path = Path(target).expanduser()
    if path.suffix == ".ckpt":
        model, tok = _from_checkpoint(path, base, tokenizer)
        if dtype is not None:
            model.to(DTYPES[dtype])
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


def _parser() -> CommandParser:
    ap = command_parser("pruning eval", __doc__.split("\n\n")[0])
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
        "--base",
        default=None,
        help="for a .ckpt of your own LightningModule: the Hugging Face model it trains (path or hub name; its config "
        "is read from there, the weights from the checkpoint)",
    )
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
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, tok, info = load_for_eval(
            args.model, args.dtype, args.tokenizer, args.attn_implementation, args.allow_pickle, args.base
        )
    except PickleRefused as err:
        raise SystemExit(f"pruning eval: {err}") from None
    model.to(device)
    protocol = dict(
        dataset_config=args.dataset_config,
        split=args.split,
        text_field=args.text_field,
        seq_len=args.seq_len,
        stride=args.stride,
        add_bos=args.add_bos,
        max_windows=args.max_windows,
    )
    evaluation = Evaluation(
        perplexity=args.perplexity,
        perplexity_options={k: v for k, v in protocol.items() if v is not None},
        tasks=list(args.tasks or []),
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        include_path=args.include_path,
        metrics=args.metrics,
        batch_size=args.batch_size,
    )
    out: dict[str, Any] = {"model": info, **evaluation.run(model, tok, device)}
    for line in evaluation_lines(out):
        print(line, flush=True)
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
