"""Peak memory per rank of gradient scoring under FSDP2, 1 rank vs 2 ranks (CPU, gloo), and the one-shot path's
layer-at-a-time peak.

FSDP part: Lightning ``ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)`` on ``N`` CPU processes,
:class:`pruning.lightning.DistillationModule` with a ``copy`` teacher (sharded like the student by ``configure_model``),
SDMPrune's distillation scoring (``sdm``, ``mlp_neuron``, α=0.42, τ=0.5) for ``--steps`` optimiser steps of one
sequence per rank, then one pruning event. ``N = 1`` is the same code on one process (FSDP over a mesh of one:
nothing sharded). Measured in every rank (Linux ``/proc``): RSS after setup (the model sharded, freed memory
trimmed); the peak RSS over the scoring steps (VmHWM reset just before the first step, read before the event); the
peak RSS of the event (scoring from the statistics: every FSDP module unsharded for it); the process's lifetime
peak (VmHWM without reset: includes the whole model built on every rank before ``configure_model`` shards it).

Every configuration runs three times in fresh processes, because each probe disturbs what another measures:

- ``rss``: RSS with glibc told to hand every block of 128 KiB or more straight back to the system
  (``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``), so the peak follows the memory actually in use;
- ``rss_default``: the same with glibc's defaults (its dynamic mmap threshold keeps freed blocks of up to 32 MiB in
  per-thread arenas, gloo's threads included): what a user sees, but partly the allocator's retained free memory;
- ``tensor``: net tensor bytes allocated at once (torch.profiler allocation records); the profiler's own records
  inflate RSS by about a GiB here, which is why RSS comes from the other two runs.

``--meta-init`` builds the student and the teacher copy with ``DistillationModule(meta_init=True)`` from a
checkpoint of the same model written beforehand (by the driver, outside the measured processes): each rank builds
both on the ``meta`` device, shards them, then reads only its rows of the safetensors. The process's lifetime peak
(VmHWM from start to end, across every reset) is the number this is for: without it every rank first builds the
whole student and teacher. ``--measures rss`` runs only the RSS probe (a third of the time).

``--criterion gblm`` scores GBLM (``unstructured``, per-weight Σg² plus activation norms) instead of SDMPrune: its
per-weight statistic has the size of the targeted weights and is held on the local rows of each shard.

One-shot part: ``pruning.prune(model, calib, 'wanda', device=...)`` with the model on the host, layers visiting
``device`` one at a time; on CPU only the host RSS can be measured (the compute device is the host).

    .venv/bin/python benchmarks/fsdp_memory.py            # about 4 minutes on 2 cores
    .venv/bin/python benchmarks/fsdp_memory.py --vocab 4096 --hidden 768 --inter 2048 --layers 8 --heads 12
    .venv/bin/python benchmarks/fsdp_memory.py --quick
    .venv/bin/python benchmarks/fsdp_memory.py --meta-init --measures rss --no-oneshot
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from probes import TensorPeak, rss_peak, settle  # noqa: E402


def model_config(args) -> dict:
    return dict(
        model_type="llama",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.inter,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(512, args.seq),
    )


# glibc: blocks of 128 KiB and more mmap-ed and handed back when freed (no dynamic threshold), top trimmed early
MALLOC_EXACT = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
MEASURES = {"rss": MALLOC_EXACT, "rss_default": {}, "tensor": MALLOC_EXACT}


# ---------------------------------------------------------------------------------------------- FSDP worker
def worker(args) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader, DistributedSampler

    from pruning.callbacks import ImportanceCallback, PruningCallback
    from pruning.lightning.module import DistillationModule
    from pruning.schedule import Event, Schedule

    torch.set_num_threads(1)
    out: dict = {"rss_imports": settle(reset=False), "peak_total": 0}
    steps = args.steps

    def reset_peak() -> int:
        """settle() and reset VmHWM, the process's peak so far kept in ``peak_total`` first."""
        out["peak_total"] = max(out["peak_total"], rss_peak())
        return settle()

    class Probe(pl.Callback):
        def __init__(self, role: str) -> None:
            self.role = role

        def on_train_start(self, trainer, pl_module) -> None:
            if self.role == "first":
                out["rss_setup"] = reset_peak()
                out["param_bytes_local"] = sum(
                    (p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
                    for p in pl_module.student.parameters()
                )
                out["teacher_bytes_local"] = sum(
                    (p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
                    for p in pl_module.teacher.parameters()
                )

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if self.role == "first" and trainer.global_step == 0:
                out["t0"] = time.perf_counter()
                reset_peak()
                self.tp = TensorPeak() if args.measure == "tensor" else None
                if self.tp is not None:
                    self.tp.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step != steps:
                return
            if self.role == "first":  # before the pruning callback's event
                out["peak_scoring"] = rss_peak()
                out["tensor_peak_scoring"] = self.tp.stop() if self.tp is not None else None
                out["scoring_s"] = time.perf_counter() - out.pop("t0")
                reset_peak()
            else:  # after it
                out["peak_event"] = rss_peak()

    source = {"pretrained": args.checkpoint, "config": None} if args.checkpoint else {"config": model_config(args)}
    m = DistillationModule(
        **source, teacher="copy", alpha=0.0, attn_implementation="sdpa", meta_init=bool(args.checkpoint)
    )
    # scoring on frozen weights, as the recipes do (FIX: freeze_weights defaults to False since the batched gradient
    # statistics, and without it the scoring steps trained: gradients and AdamW's moments, ~3 model sizes, were
    # in the peaks)
    ic = ImportanceCallback(freeze_weights=True)
    if args.criterion == "sdm":
        pc = PruningCallback(
            "sdm", "mlp_neuron", Schedule(kind="steps", events=[Event(steps, 0.2, alpha=0.42, temperature=0.5)])
        )
    else:
        pc = PruningCallback(args.criterion, "unstructured", Schedule(kind="steps", events=[Event(steps, 0.5)]))
    tr = pl.Trainer(
        accelerator="cpu",
        devices=args.world,
        max_steps=steps,
        strategy=ModelParallelStrategy(data_parallel_size=args.world, tensor_parallel_size=1),
        callbacks=[Probe("first"), ic, pc, Probe("last")],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, args.vocab, (args.seq,), generator=g)} for _ in range(2 * steps)]
    sampler = DistributedSampler(data, num_replicas=args.world, rank=tr.global_rank, shuffle=False)
    tr.fit(m, DataLoader(data, batch_size=1, sampler=sampler))
    out["peak_lifetime"] = rss_peak()  # VmHWM was reset above: this is the last window's; lifetime below
    out["peak_total"] = max(out["peak_total"], out["peak_lifetime"])  # from start to end, every window
    with open("/proc/self/status") as f:
        out["vm_peak_lifetime"] = next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmPeak:"))
    out["params"] = sum(p.numel() for p in m.student.parameters())
    out["rank"], out["world"] = tr.global_rank, args.world
    Path(f"{args.out}.rank{tr.global_rank}.json").write_text(json.dumps(out))


# ---------------------------------------------------------------------------------------------- one-shot worker
def oneshot_worker(args) -> None:
    from pruning import prune
    from pruning.lightning.module import build_model

    torch.set_num_threads(1)
    out = {"rss_imports": settle()}
    model = build_model(None, model_config(args), attn_implementation="sdpa")
    out["params"] = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, args.vocab, (1, args.seq), generator=g) for _ in range(args.calib)]
    out["rss_model"] = settle()
    t = time.perf_counter()
    prune(model, calib, "wanda", 0.5, "unstructured", device="cpu", store="cpu", progress=False)
    out["prune_s"] = time.perf_counter() - t
    out["peak_prune"] = rss_peak()
    Path(f"{args.out}.oneshot.json").write_text(json.dumps(out))


# ---------------------------------------------------------------------------------------------- driver
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--oneshot-worker", action="store_true")
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--out", default="")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inter", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--criterion", default="sdm", choices=["sdm", "gblm"])
    ap.add_argument("--measure", default="rss", choices=list(MEASURES))
    ap.add_argument("--no-oneshot", action="store_true")
    ap.add_argument("--meta-init", action="store_true")
    ap.add_argument("--checkpoint", default="")  # worker: meta_init from this checkpoint (set by --meta-init)
    ap.add_argument("--measures", default=",".join(MEASURES))
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.oneshot_worker:
        return oneshot_worker(args)
    if args.quick:
        args.hidden, args.inter, args.layers, args.vocab, args.steps = 128, 256, 2, 1024, 2
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"fsdp_memory_{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    shape = [
        "--hidden",
        str(args.hidden),
        "--inter",
        str(args.inter),
        "--layers",
        str(args.layers),
        "--heads",
        str(args.heads),
        "--vocab",
        str(args.vocab),
        "--seq",
        str(args.seq),
        "--steps",
        str(args.steps),
        "--calib",
        str(args.calib),
        "--criterion",
        args.criterion,
    ]
    measures = args.measures.split(",")
    if not set(measures) <= set(MEASURES) or "rss" not in measures:
        raise SystemExit(f"--measures={args.measures!r} must list some of {list(MEASURES)}, rss included")
    if args.meta_init:  # the same model, written once; every run builds it on meta and reads its rows
        from pruning import save_pretrained
        from pruning.lightning.module import build_model

        save_pretrained(build_model(None, model_config(args)), tmp / "checkpoint")
        shape += ["--checkpoint", str(tmp / "checkpoint")]
    clean = {k: v for k, v in env.items() if not k.startswith("MALLOC_")}
    results: dict = {}
    for world in (1, 2):
        for measure in measures:
            extra_env = MEASURES[measure]
            out = tmp / f"w{world}_{measure}"
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    "--world",
                    str(world),
                    "--out",
                    str(out),
                    "--measure",
                    measure,
                    *shape,
                ],
                cwd=ROOT,
                env=dict(clean, **extra_env),
                capture_output=True,
                text=True,
                timeout=1200,
            )
            if proc.returncode:
                raise SystemExit(proc.stdout[-2000:] + proc.stderr[-4000:])
            for r in range(world):
                got = json.loads(Path(f"{out}.rank{r}.json").read_text())
                row = results.setdefault(world, {}).setdefault(r, {})
                row.update({f"{k}_{measure}": v for k, v in got.items()})
                row.update({k: v for k, v in got.items() if measure == "rss"})
    oneshot = None
    if not args.no_oneshot:
        proc = subprocess.run(
            [sys.executable, __file__, "--oneshot-worker", "--out", str(tmp / "o"), *shape],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        if proc.returncode:
            raise SystemExit(proc.stderr[-4000:])
        oneshot = json.loads((tmp / "o.oneshot.json").read_text())

    report(args, measures, results, oneshot)


def report(args, measures: list[str], results: dict, oneshot: dict | None) -> None:
    """Print the table of every rank's numbers and the 2-rank / 1-rank ratios."""
    mib = 1 / 2**20
    params = results[1][0]["params"]
    what = (
        "sdm scoring (mlp_neuron), α=0.42"
        if args.criterion == "sdm"
        else f"{args.criterion} scoring (unstructured, per-weight gradient statistics)"
    )
    print(
        f"model: llama hidden={args.hidden} inter={args.inter} layers={args.layers} vocab={args.vocab}: "
        f"{params / 1e6:.1f}M parameters ({params * 4 * mib:.0f} MiB fp32); student + teacher copy; "
        f"{what}, {args.steps} steps of one {args.seq}-token sequence per rank\n"
    )
    print(
        "| ranks | rank | student params held (MiB) | teacher params held (MiB) | RSS after setup (MiB) | "
        "peak RSS scoring (MiB) | peak RSS scoring, glibc defaults (MiB) | peak tensor bytes scoring (MiB) | "
        "peak RSS event (MiB) | peak RSS start to end (MiB) | scoring time (s) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def cell(r: dict, key: str) -> str:
        return f"{r[key] * mib:.0f}" if r.get(key) is not None else "–"

    for world, ranks in results.items():
        for _, r in sorted(ranks.items()):
            cells = [
                world,
                r["rank"],
                f"{r['param_bytes_local'] * mib:.0f}",
                f"{r['teacher_bytes_local'] * mib:.0f}",
                f"{r['rss_setup'] * mib:.0f}",
                f"{r['peak_scoring'] * mib:.0f}",
                cell(r, "peak_scoring_rss_default"),
                cell(r, "tensor_peak_scoring_tensor"),
                f"{r['peak_event'] * mib:.0f}",
                f"{r['peak_total'] * mib:.0f}",
                f"{r['scoring_s']:.1f}",
            ]
            print("| " + " | ".join(map(str, cells)) + " |")
    peak = {w: max(r["peak_scoring"] for r in ranks.values()) for w, ranks in results.items()}
    total = {w: max(r["peak_total"] for r in ranks.values()) for w, ranks in results.items()}
    base = {w: min(r["rss_imports"] for r in ranks.values()) for w, ranks in results.items()}
    tensors = ""
    if "tensor" in measures:
        tens = {w: max(r["tensor_peak_scoring_tensor"] for r in ranks.values()) for w, ranks in results.items()}
        tensors = f", peak tensor bytes scoring {tens[2] / tens[1]:.2f}"
    print(
        f"\nworst rank, 2 ranks / 1 rank: peak RSS scoring {peak[2] / peak[1]:.2f} "
        f"({(peak[2] - base[2]) / (peak[1] - base[1]):.2f} above the {base[1] * mib:.0f} MiB the imports take in "
        f"every process){tensors}; peak RSS start to end {total[2] / total[1]:.2f} "
        f"({(total[2] - base[2]) / (total[1] - base[1]):.2f} above the imports)"
        + (" with meta_init" if args.meta_init else "")
    )
    if oneshot is not None:
        print(
            f"\none-shot wanda (device=cpu, store=cpu, {args.calib} x {args.seq} tokens): RSS with the model "
            f"{oneshot['rss_model'] * mib:.0f} MiB, peak while pruning {oneshot['peak_prune'] * mib:.0f} MiB, "
            f"{oneshot['prune_s']:.1f} s"
        )


if __name__ == "__main__":
    main()
