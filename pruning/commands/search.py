"""``pruning search``: Self-Pruner's evolutionary search of per-layer rates on a model; writes the best rates as
JSON for a recipe's ``PruningCallback(allocation: rates, rates_file: ...)``."""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path

import torch
from torch import nn

from ..allocation.operators import LLM_OPERATORS, ChatEndpoint, LLMOperator
from ..allocation.search import SEARCH_GRANULARITIES, search_rates
from ..io import write_json
from ..loading import from_pretrained
from .parsing import CommandParser, command_parser

CALIBRATION_SHARE = 0.9  # of the token stream; the rest is the search split


def add_data_arguments(ap: CommandParser) -> None:
    """Model and calibration-data options shared by ``pruning.allocation.search`` and ``pruning.allocation.ranking``."""
    ap.add_argument(
        "--text",
        nargs="*",
        default=None,
        help="local text files for calibration (tokenised with the model's tokenizer); default: the "
        "offline stdlib corpus, byte-level (the demo model's tokenisation)",
    )
    ap.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--calibration", type=int, default=32, help="calibration windows (scoring)")
    ap.add_argument(
        "--heldout",
        type=int,
        default=16,
        help="windows of the search split (the fitness of search; the last 10 %% of the token stream, which "
        "calibration never reads)",
    )
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default=None, help="e.g. cuda (default: where the model loads, CPU)")


def load_model(path: str, dtype: str = "float32", device: str | None = None) -> nn.Module:
    model = from_pretrained(path, key="--model", dtype=getattr(torch, dtype)).eval()
    return model.to(device) if device is not None else model


def load_data(args: Namespace, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Calibration and search-split windows from one token stream: scoring windows from its first 90 %, the search
    split's windows (Self-Pruner's fitness) from the rest, so the two never overlap."""
    from ..text.reader import TextReader
    from ..text.stdlib import batches, stdlib_bytes, windows
    from ..text.tokens import joined_ids

    if args.text:
        from transformers import AutoTokenizer

        # every file one document, read as text whatever its suffix (undecodable bytes replaced), joined with a
        # blank line and tokenised once with the tokenizer's special tokens
        reader = TextReader(
            args.text, builder="text", encoding_errors="replace", keep_empty=True, owner="pruning", key="--text"
        )
        tok = AutoTokenizer.from_pretrained(args.tokenizer or model.name_or_path)
        ids = joined_ids(reader.documents(), tok, "\n\n", special_tokens=True)
    else:
        ids = stdlib_bytes("train", max_bytes=4_000_000)
    cut = int(ids.numel() * CALIBRATION_SHARE)
    need = args.seq_len + 1
    if cut < need or ids.numel() - cut < need:
        raise ValueError(f"{ids.numel()} tokens are too few for windows of {args.seq_len}")
    calib = windows(ids[:cut], args.seq_len, args.calibration, seed=args.seed)
    held = windows(ids[cut:], args.seq_len, args.heldout, seed=args.seed + 1)
    return list(batches(calib, args.batch_size)), list(batches(held, args.batch_size))


def operator_of(args: Namespace) -> str | LLMOperator | None:
    """The operator model the flags name: a local path, an endpoint (wrapped in an :class:`LLMOperator`), or none.
    Every operator flag is checked here, before the model is loaded."""
    ops = [op.strip() for op in args.llm_operators.split(",") if op.strip()]
    bad = [op for op in ops if op not in LLM_OPERATORS]
    if bad or not ops:
        raise SystemExit(
            f"--llm-operators {args.llm_operators!r}: {'unknown ' + str(bad) if bad else 'empty'}. HINT: a "
            f"comma-separated subset of {','.join(LLM_OPERATORS)} (or no operator model for the classical search)"
        )
    if args.operator_endpoint is None:
        stray = [f for f in ("operator_endpoint_model", "operator_api_key_env") if getattr(args, f) is not None]
        if stray:
            flags = ", ".join("--" + f.replace("_", "-") for f in stray)
            raise SystemExit(f"{flags} without --operator-endpoint. HINT: add --operator-endpoint URL")
        return args.operator_model
    if args.operator_model is not None or not args.operator_endpoint_model:
        raise SystemExit(
            "--operator-endpoint needs --operator-endpoint-model NAME and excludes --operator-model. "
            "HINT: e.g. --operator-endpoint http://localhost:8000/v1 --operator-endpoint-model my-model"
        )
    endpoint = ChatEndpoint(
        args.operator_endpoint,
        args.operator_endpoint_model,
        api_key_env=args.operator_api_key_env,
        max_tokens=args.operator_max_new_tokens,
    )
    return LLMOperator(endpoint)


def parser():
    """The ``pruning search`` arguments."""
    ap = command_parser("pruning search", main.__doc__)
    ap.add_argument("--model", required=True, help="local path or hub name of the model to prune")
    ap.add_argument("--target", type=float, required=True, help="mean pruning rate over the layers")
    ap.add_argument("--criterion", default="wanda")
    ap.add_argument("--criterion-options", type=dict | None, default=None, help='JSON, e.g. \'{"mode": "vector"}\'')
    ap.add_argument("--granularity", default="mlp_neuron", choices=list(SEARCH_GRANULARITIES))
    ap.add_argument("--population", type=int, default=30)
    ap.add_argument("--generations", type=int, default=20)
    ap.add_argument("--mutations", type=int, default=10)
    ap.add_argument("--crossovers", type=int, default=10)
    ap.add_argument("--max-rate", type=float, default=0.9)
    ap.add_argument("--operator-model", default=None, help="local causal LM used as the genetic operator")
    ap.add_argument(
        "--operator-max-new-tokens",
        type=int,
        default=None,
        help="longest operator answer (default: enough for the lists asked, from the number of layers)",
    )
    ap.add_argument(
        "--operator-endpoint",
        default=None,
        help="instead of --operator-model: an OpenAI-compatible API base URL, e.g. http://localhost:8000/v1",
    )
    ap.add_argument("--operator-endpoint-model", default=None, help="the model name the endpoint serves")
    ap.add_argument(
        "--operator-api-key-env", default=None, help="name of the environment variable holding the endpoint's key"
    )
    ap.add_argument(
        "--llm-operators",
        default=",".join(LLM_OPERATORS),
        help="operators asked of the operator model (comma-separated subset of the default)",
    )
    ap.add_argument("--out", default="self_pruner_rates.json", help="best rates (JSON)")
    ap.add_argument("--history", default=None, help="search history (JSON; default: <out>.history.json)")
    add_data_arguments(ap)
    return ap


def main(argv: list[str] | None = None) -> None:
    """``pruning search``: Self-Pruner's rate search; writes the best rates as JSON for a recipe."""
    args = parser().parse_args(argv)
    operator = operator_of(args)
    model = load_model(args.model, args.dtype, args.device)
    calib, held = load_data(args, model)
    history = args.history or str(Path(args.out).with_suffix("")) + ".history.json"
    result = search_rates(
        model,
        calib,
        held,
        args.target,
        args.criterion,
        args.granularity,
        criterion_options=args.criterion_options,
        population=args.population,
        generations=args.generations,
        mutations=args.mutations,
        crossovers=args.crossovers,
        operator_model=operator,
        operator_options={"max_new_tokens": args.operator_max_new_tokens, "device": args.device},
        llm_operators=[op.strip() for op in args.llm_operators.split(",") if op.strip()],
        seed=args.seed,
        history_path=history,
        max_rate=args.max_rate,
        device=args.device,
    )
    out = {
        "method": "self-pruner",
        "target": args.target,
        "criterion": args.criterion,
        "granularity": args.granularity,
        "layer_rates": result.rates,
        "fitness": result.fitness,
        "uniform_fitness": result.uniform_fitness,
        "fitness_measured_on": f"search split: {args.heldout} windows of the last {1 - CALIBRATION_SHARE:.0%} of the "
        "calibration text (not held-out data)",
        "history": history,
    }
    write_json(args.out, out)
    # the fitness is measured on the search split (the end of the calibration stream), not on held-out text
    print(
        f"best search-split ppl {result.fitness:.4f} (uniform rates: {result.uniform_fitness:.4f}; {args.heldout} "
        f"windows of the last {1 - CALIBRATION_SHARE:.0%} of the calibration text, not a held-out test set: "
        f"`pruning eval` measures that); wrote {args.out}"
    )
    print("layer_rates: [" + ", ".join(f"{r:.6g}" for r in result.rates) + "]")


if __name__ == "__main__":
    main()
