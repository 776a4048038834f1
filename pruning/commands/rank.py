"""``pruning rank``: SAAP's σ and importance-fluctuation layer rates for a model, written as JSON for a recipe
(``criterion_options`` and ``rates_file``)."""

from __future__ import annotations

import json
import sys

from ..allocation.ranking import saap_layer_rates, saap_scores
from ..io import write_json
from .parsing import command_parser
from .search import add_data_arguments, load_data, load_model


def main(argv: list[str] | None = None) -> None:
    """``pruning rank``: SAAP's σ and layer rates for a model, written as JSON for a recipe."""
    ap = command_parser("pruning rank", main.__doc__)
    ap.add_argument("--model", required=True, help="local path or hub name of the model")
    ap.add_argument("--target", type=float, required=True, help="mean pruning rate over the layers")
    ap.add_argument("--granularity", default="mlp_neuron", choices=["mlp_neuron", "attention_head", "query_head"])
    ap.add_argument("--fluctuation", default="batches", choices=["batches", "groups"])
    ap.add_argument("--spread", type=float, default=0.1, help="rates range over target ± spread before repair")
    ap.add_argument("--max-rate", type=float, default=0.9)
    ap.add_argument("--skip-layers", type=int, nargs="*", default=[], help="layers left unpruned")
    ap.add_argument("--per-layer-sigma", action="store_true", help="one σ pair per layer instead of one")
    ap.add_argument("--second-order", action="store_true", help="the element term with its diagonal second-order part")
    ap.add_argument("--out", default="saap_rates.json")
    add_data_arguments(ap)
    args = ap.parse_args(argv)
    model = load_model(args.model, args.dtype, args.device)
    calib, _ = load_data(args, model)
    est = saap_scores(
        model,
        calib,
        args.granularity,
        per_layer_sigma=args.per_layer_sigma,
        second_order=args.second_order,
        device=args.device,
    )
    rates, ind = saap_layer_rates(est, args.target, args.fluctuation, args.spread, args.max_rate, args.skip_layers)
    out = {
        "method": "saap",
        "target": args.target,
        "granularity": args.granularity,
        "criterion_options": est.criterion_options(),
        "layer_rates": rates,
        "fluctuation": ind,
        "fluctuation_kind": args.fluctuation,
    }
    write_json(args.out, out)
    print(json.dumps({"criterion_options": out["criterion_options"], "layer_rates": rates}))
    print(f"wrote {args.out} (SAAP's σ and layer rates from {args.calibration} calibration windows)", file=sys.stderr)


if __name__ == "__main__":
    main()
