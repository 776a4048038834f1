"""The LightningModule: a student that is pruned and trained, and its frozen original as the distillation teacher.

Loss per token, over positions whose label is not -100: ``(1−α)·CE + α·KL(softmax(z_t/τ) ‖ softmax(z_s))``.

Where the teacher's logits come from (``teacher``):

- ``lifted`` (default): the student's own parameters with the masks lifted (the pruned values are stashed on the
  host when a mask is applied and written back for the teacher's forward). No second copy of the model exists.
  This is exact only while weights are frozen, i.e. during scoring steps; a weight-changing step with ``α > 0``
  is refused with a hint.
- ``copy``: a frozen copy rebuilt from the same source (``pretrained`` path or ``config`` + ``init_seed``),
  optionally in a lower precision (``teacher_dtype``). It is never in the optimiser and never written into
  checkpoints; a resumed run rebuilds it from its source.
- ``none``: no teacher; ``α`` must stay 0.

Models load from a hub name or a local path with ``from_pretrained`` (safetensors only, never unpickled; remote
code only with ``trust_remote_code: true``) or are built from ``config`` (random init, seeded) for tests and demos.
Recovery with LoRA (``lora``): adapters are injected when the module is built (so DDP sees them from the start),
initialised from ``init_seed`` (the same on every rank), and merged at the end of fit; masks are re-applied after
the merge, so pruned weights stay exactly zero. Under FSDP2 the adapters are sharded with their decoder layer and
each rank merges its own rows of the update (:func:`pruning.lora.merge_shards`).

FSDP2 (Lightning's ``ModelParallelStrategy``, CPU/gloo or GPU/NCCL): :meth:`DistillationModule.configure_model`
shards every decoder layer, then the root, over the data-parallel mesh (the ``copy`` teacher too); parameters
become ``DTensor``s sharded by rows. The student is built whole on every rank in ``__init__`` (host memory: one
full model per rank until ``configure_model`` shards it) unless ``meta_init``: then it is built on the meta device
and each rank loads only its rows after sharding. LoRA adapters are sharded with their layers. Tensor parallelism
is refused.
"""

from __future__ import annotations

import difflib
import math
from contextlib import nullcontext
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from ..evaluation.metrics import PerplexityMetric
from ..loading import from_pretrained
from ..lora import LoraSettings, base_layers, base_name, initial_adapters
from ..lora import inject as inject_lora
from ..lora import merge as merge_lora
from ..losses import ChunkedLogits, distillation_loss
from ..masks import MaskSet
from ..surgery import is_per_layer_export, load_pretrained
from .meta import build_on_meta_device, materialise_model

# causal LMs whose logits are exactly lm_head(final hidden state) (no soft-capping or logit scale)
_PLAIN_HEAD = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "OPTForCausalLM"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(name: str | None, key: str) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"{key}={name!r} must be one of {sorted(DTYPES)}")
    return DTYPES[name]


def build_model(
    pretrained: str | None,
    config: dict | None,
    *,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    seed: int = 0,
    allow_pickle: bool = False,
    meta: bool = False,
) -> PreTrainedModel:
    """A causal LM from a hub name or local path (``from_pretrained``, safetensors only unless ``allow_pickle``) or
    from a config dict (``{"model_type": "llama", ...}``, random init seeded by ``seed``). ``meta``: its parameters
    on the ``meta`` device, the weights loaded later (:func:`materialise_model`)."""
    if (pretrained is None) == (config is None):
        raise ValueError(
            "give exactly one of pretrained= (hub name or path) and config= (dict with model_type). "
            "HINT: set model.pretrained or model.config"
        )
    torch_dtype = _dtype(dtype, "dtype")
    if meta:
        return build_on_meta_device(pretrained, config, torch_dtype, attn_implementation)
    kwargs: dict[str, Any] = {}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if pretrained is not None:
        if is_per_layer_export(pretrained):  # non-uniform widths: built layer by layer from its per_layer_config
            return load_pretrained(pretrained, allow_pickle=allow_pickle, dtype=torch_dtype, **kwargs)
        return from_pretrained(
            pretrained,
            allow_pickle=allow_pickle,
            key="model.pretrained",
            dtype=torch_dtype,
            trust_remote_code=trust_remote_code,
            revision=revision,
            **kwargs,
        )
    hf_config = config_from_dict(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = AutoModelForCausalLM.from_config(
            hf_config, dtype=torch_dtype, trust_remote_code=trust_remote_code, **kwargs
        )
    return out


def config_from_dict(config: dict) -> PretrainedConfig:
    """A Hugging Face config from ``{"model_type": ..., **fields}``, refusing fields its class does not have.

    FIX: ``AutoConfig.for_model`` keeps any keyword as an attribute, so a typo (``num_hiden_layers``) silently built
    the default model and was written into the exported config. A key that ends up as an attribute a default
    config of the class lacks is refused (keys the class consumes, such as a legacy ``rope_theta``, are fine)."""
    cfg = dict(config)
    if "model_type" not in cfg:
        raise ValueError(f"model.config={config} has no model_type. HINT: e.g. config: {{model_type: llama, ...}}")
    model_type = cfg.pop("model_type")
    hf_config = AutoConfig.for_model(model_type, **cfg)
    known = set(AutoConfig.for_model(model_type).__dict__)
    stray = sorted(k for k in set(hf_config.__dict__) - known if k in cfg)
    if stray:
        close = difflib.get_close_matches(stray[0], sorted(k for k in known if not k.startswith("_")), n=1)
        raise ValueError(
            f"model.config.{stray[0]}={cfg[stray[0]]!r} is not a field of {type(hf_config).__name__}"
            + (f" (did you mean {close[0]!r}?)" if close else "")
            + f". HINT: fix or remove model.config.{stray[0]}"
        )
    return hf_config


class DistillationModule(pl.LightningModule):
    """Teacher + student self-distillation for pruning and recovery (see the module docstring).

    The callbacks in ``callbacks/`` find the Hugging Face model at ``.student`` and read and write ``alpha``,
    ``temperature``, ``masks`` and ``weights_frozen`` (the contract a user-written module may also follow).
    """

    def __init__(
        self,
        pretrained: str | None = None,
        config: dict | None = None,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        revision: str | None = None,
        init_seed: int = 0,
        tokenizer_path: str | None = None,
        alpha: float = 0.0,
        temperature: float = 1.0,
        kl_positions: Literal["labelled", "all"] = "labelled",
        teacher: Literal["lifted", "copy", "none"] = "lifted",
        teacher_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        scheduler: Literal["constant", "cosine"] = "constant",
        min_lr_ratio: float = 0.0,
        gradient_checkpointing: bool = False,
        lora: LoraSettings | None = None,
        keep_zeros: bool = False,
        allow_pickle: bool = False,
        meta_init: bool = False,
    ) -> None:
        """
        Args:
            pretrained: hub name or local path of the model to prune (``from_pretrained``).
            config: instead of ``pretrained``: a config dict with ``model_type`` for a randomly initialised model.
            dtype: parameter dtype of the student.
            attn_implementation: e.g. ``sdpa``, ``eager``, ``flash_attention_2`` (default: transformers' choice).
            trust_remote_code: allow modeling code shipped with the checkpoint (off: never run code from a hub).
            revision: hub revision (branch, tag or commit) of ``model``.
            init_seed: seed of the random initialisation when ``config`` is given, and of the LoRA adapters' start.
            tokenizer_path: tokenizer name or path, exposed as ``.tokenizer`` (default: ``pretrained``'s, if any).
            alpha: distillation weight α (0 = plain cross-entropy).
            temperature: τ, dividing the teacher logits only (τ < 1 sharpens the teacher, SDMPrune's choice).
            kl_positions: the KL averaged over the labelled next-token positions (``labelled``, default) or over every
                position (``all``: SDMPrune's code, ``KL / seq_len``; see :func:`pruning.losses.distillation_loss`).
                The ImportanceCallback's per-sequence statistics split the batch's loss by labelled positions: exact
                for ``all`` when every sequence of a micro-batch has as many (packed text, no padding).
            teacher: ``lifted`` (same weights, masks lifted; frozen steps only), ``copy`` or ``none``.
            teacher_dtype: dtype of the teacher copy (default: ``dtype``).
            lr: peak learning rate (AdamW).
            weight_decay: AdamW weight decay.
            betas: AdamW betas.
            warmup_steps: linear warm-up steps.
            scheduler: ``constant`` or ``cosine`` (to ``min_lr_ratio``·lr at the last step) after the warm-up.
            min_lr_ratio: final learning rate of the cosine schedule as a fraction of ``lr``.
            gradient_checkpointing: recompute activations in backward (less memory, ~30 % more compute).
            lora: LoRA recovery settings; base weights are frozen, the adapters start from ``init_seed`` (the same
                on every rank, with or without ``meta_init``) and are merged at the end of fit (on each rank's rows
                under FSDP2).
            keep_zeros: the exact zeros of the decoder layers' Linear weights become masks (recovering an
                unstructured export: training and LoRA merges cannot revive them).
            allow_pickle: also load ``pretrained`` weights stored as pickles (``pytorch_model.bin``), which can run
                code when loaded: only for files you trust (default: safetensors only).
            meta_init: build the student (and the ``copy`` teacher) with its parameters on the ``meta`` device and
                load the weights in ``configure_model``: under FSDP2 after sharding, each rank reading only its rows
                of a local safetensors checkpoint (from a ``config``: rank 0's initialisation, broadcast), so no rank
                holds the whole model on its host.
        """
        super().__init__()
        self.save_hyperparameters()
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha={alpha} must be in [0, 1]. HINT: model.alpha")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0. HINT: model.temperature")
        if teacher not in ("lifted", "copy", "none"):
            raise ValueError(f"teacher={teacher!r} must be 'lifted', 'copy' or 'none'")
        if teacher == "none" and alpha > 0:
            raise ValueError(f"alpha={alpha} needs a teacher. HINT: set teacher: lifted or copy, or alpha: 0")
        if scheduler not in ("constant", "cosine"):
            raise ValueError(f"scheduler={scheduler!r} must be 'constant' or 'cosine'")
        _dtype(teacher_dtype, "teacher_dtype")
        self.alpha = alpha
        self.temperature = temperature
        if kl_positions not in ("labelled", "all"):
            raise ValueError(f"kl_positions={kl_positions!r} must be 'labelled' or 'all'. HINT: model.kl_positions")
        self.kl_positions = kl_positions
        self.teacher_mode = teacher
        self.masks: MaskSet | None = None  # set by the pruning callback; the lifted teacher reads it
        self.weights_frozen = False  # set by the importance callback during scoring steps
        if meta_init and (trust_remote_code or revision is not None):
            raise ValueError(
                "meta_init builds a local checkpoint's own model class without weights; it does not combine with "
                "trust_remote_code or revision. HINT: leave meta_init off for those"
            )
        self.student = build_model(
            pretrained,
            config,
            dtype=dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            revision=revision,
            seed=init_seed,
            allow_pickle=allow_pickle,
            meta=meta_init,
        )
        self.student.train()  # from_pretrained returns eval mode; Lightning would warn about every module
        if gradient_checkpointing:
            self.student.gradient_checkpointing_enable()
        self.tokenizer = self._load_tokenizer(
            tokenizer_path or pretrained, trust_remote_code, required=tokenizer_path is not None
        )
        if keep_zeros and not meta_init:  # else once the weights are loaded (configure_model)
            self._keep_zeros()
        self._teacher: list[PreTrainedModel] = []  # a list keeps the copy out of children, state_dict, optimiser
        self._peft = None
        self.lora = LoraSettings.of(lora)
        if self.lora is not None:
            self._peft = inject_lora(self.student, self.lora, lambda: self.masks, seed=init_seed)
        self.val_perplexity = PerplexityMetric()  # Σ NLL and Σ tokens of the validation epoch, over every rank

    # ------------------------------------------------------------------ building
    @staticmethod
    def _load_tokenizer(name: str | None, trust_remote_code: bool, required: bool):
        if name is None:
            return None
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, TypeError):
            if required:
                raise
            return None  # a model directory without tokenizer files (e.g. the byte-level demo model)

    def _keep_zeros(self) -> None:
        from ..structure import ModelStructure

        with base_layers(self.student):  # LoRA (meta_init: injected before the weights are loaded)
            names = [n + ".weight" for n in ModelStructure(self.student).targets()]
        self.masks = MaskSet.from_zeros(self.student, names)

    def _materialise(self) -> None:
        """``meta_init``: the weights of the student and of the ``copy`` teacher, loaded where they are (sharded or
        not), once."""
        hp = self.hparams
        for model, dtype in ((self.student, hp.dtype), (self.teacher, hp.teacher_dtype or hp.dtype)):
            if model is None or not any(p.is_meta for p in model.parameters()):
                continue

            def full(dtype=dtype):
                return build_model(hp.pretrained, hp.config, dtype=dtype, seed=hp.init_seed)

            known = rename = None
            if model is self.student and self._peft is not None:  # LoRA: the seeded adapters, the wrapped names
                known, rename = initial_adapters(model, hp.init_seed), base_name
            materialise_model(model, hp.pretrained, full, known=known, rename=rename)
        if hp.keep_zeros and self.masks is None:
            self._keep_zeros()

    def merge_lora(self) -> None:
        """Merge the adapters into the base weights and drop them, then re-apply the masks (a merge adds B·A to
        every entry, pruned ones included)."""
        if self._peft is None:
            return
        self.student = merge_lora(self._peft, self.masks)
        self._peft = None

    def configure_model(self) -> None:
        """FSDP2 under ``ModelParallelStrategy``: ``fully_shard`` each decoder layer, then the root, of the student
        (and of the ``copy`` teacher) over the data-parallel mesh. Without a device mesh (any other strategy): no-op.

        FIX: with the strategy's defaults (``data_parallel_size: auto`` = number of nodes, ``tensor_parallel_size:
        auto`` = devices per node) a one-node run builds a pure tensor-parallel mesh, on which every rank is fed the
        same batches; there is no tensor-parallel plan here, so such a mesh would silently train one replica on a
        fraction of the data. It is refused."""
        mesh = self._device_mesh
        if mesh is None:
            self._materialise()
            return
        from ..distributed import is_sharded, shard_model
        from ..structure import ModelStructure

        names = tuple(mesh.mesh_dim_names or ())
        tp = mesh["tensor_parallel"].size() if "tensor_parallel" in names else 1
        if tp > 1 or "data_parallel" not in names:
            raise ValueError(
                f"ModelParallelStrategy built a mesh {dict(zip(names, mesh.shape))}: tensor_parallel_size={tp}, "
                "but this module only shards data-parallel (FSDP2, no tensor-parallel plan), and with a tensor-"
                "parallel mesh every rank would train on the same batches. HINT: set strategy.init_args."
                "data_parallel_size to the world size (num_nodes × devices) and strategy.init_args."
                "tensor_parallel_size: 1 (the defaults, 'auto', give data_parallel_size = number of nodes and "
                "tensor_parallel_size = devices per node)"
            )
        dp = mesh["data_parallel"]
        if not is_sharded(self.student):
            with base_layers(self.student):  # LoRA: the structure is read through PEFT's wrappers
                layers = ModelStructure(self.student).layers
            shard_model(self.student, layers, dp)  # the wrappers back: the adapters are sharded with their layer
        t = self.teacher
        if t is not None and not is_sharded(t):
            shard_model(t, ModelStructure(t).layers, dp)
        self._materialise()  # meta_init: each rank loads its rows now that the shards are laid out

    @property
    def teacher(self) -> PreTrainedModel | None:
        return self._teacher[0] if self._teacher else None

    def setup(self, stage: str) -> None:
        if self.teacher_mode == "copy" and not self._teacher:
            hp = self.hparams
            t = build_model(
                hp.pretrained,
                hp.config,
                dtype=hp.teacher_dtype or hp.dtype,
                attn_implementation=hp.attn_implementation,
                trust_remote_code=hp.trust_remote_code,
                revision=hp.revision,
                seed=hp.init_seed,
                allow_pickle=hp.allow_pickle,
                meta=hp.meta_init,
            )
            t.requires_grad_(False)
            t.eval()
            self._teacher.append(t)

    def on_fit_start(self) -> None:
        self._check_data()
        record = getattr(self.trainer.datamodule, "record", None) if self._trainer is not None else None
        if record:  # the data's seed and the sha256 of the token ids used, in the run's output and logs
            from lightning.pytorch.utilities import rank_zero_info

            digest = record.get("sha256_all", record.get("sha256"))
            rank_zero_info(
                f"data: source={record.get('source')} seed={record.get('seed')} "
                f"sequences={record.get('sequences')} sha256={digest}"
            )
            if self.logger is not None:
                self.logger.log_hyperparams({"data": record})
        if self.teacher is not None and self._device_mesh is None:  # a sharded teacher is already placed
            self.teacher.to(self.device)
        if self.masks is not None and len(self.masks) and not self.masks.attached:
            self.masks.attach(self.student)  # keep_zeros: held through every optimiser step

    def _check_data(self) -> None:
        """The data's token ids fit the model's embeddings and its sequences the position table: a clear error before
        the first step instead of an index error inside the model."""
        data = self.trainer.datamodule if self._trainer is not None else None
        config = self.student.config
        vocab = getattr(data, "vocab_size", None)
        rows = self.student.get_input_embeddings().weight.shape[0]
        if vocab is not None and vocab > rows:
            raise ValueError(
                f"data.tokenizer gives ids up to {vocab - 1}, but the model's vocabulary of {rows} ends before. "
                "HINT: set data.tokenizer to the model's own tokenizer (or `model`)"
            )
        seq_len, positions = getattr(data, "seq_len", None), getattr(config, "max_position_embeddings", None)
        if seq_len is not None and positions is not None and seq_len > positions:
            raise ValueError(
                f"data.seq_len={seq_len} is longer than the model's position table (max_position_embeddings="
                f"{positions}). HINT: lower data.seq_len"
            )

    def on_fit_end(self) -> None:
        if self.lora is not None and self.lora.merge_at_end:
            self.merge_lora()

    # ------------------------------------------------------------------ loss
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.student(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    @torch.no_grad()
    def teacher_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if self.teacher_mode == "copy":
            return self.teacher(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        if not self.weights_frozen:
            raise RuntimeError(
                f"alpha={self.alpha} with teacher='lifted' on a step that changes weights: the lifted teacher is "
                "the original model only while weights are frozen (scoring steps). HINT: set teacher: copy for "
                "distillation during recovery, or alpha: 0 outside scoring windows."
            )
        masks = self.masks
        if masks is not None and len(masks) and not masks.has_original:
            raise RuntimeError(
                "teacher='lifted' needs the original values of the pruned weights, but the masks were applied "
                "without them (keep_original off, keep_zeros, or a reconstructing criterion such as sparsegpt). "
                "HINT: set teacher: copy, or PruningCallback keep_original: true."
            )
        ctx = masks.lifted(self.student) if masks is not None and masks.has_original else nullcontext()
        head = self.student.get_output_embeddings()
        head_masked = masks is not None and any(p is head.weight for p in masks.resolve(self.student).values())
        with ctx:
            sharded = type(head.weight).__name__ == "DTensor"  # FSDP: only the root's forward gathers the head
            if type(self.student).__name__ in _PLAIN_HEAD and not head_masked and not sharded:
                # logits = lm_head(final hidden state) for these families: the loss computes the teacher's logits
                # a block of positions at a time from the hidden states (the head is not pruned, so lifting is not
                # needed for it), and the teacher's full [positions, vocab] tensor never exists
                hidden = self.student.get_decoder()(
                    input_ids=input_ids, attention_mask=attention_mask, use_cache=False
                ).last_hidden_state
                return ChunkedLogits(hidden, head)
            return self.student(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        ids, labels = batch["input_ids"], batch.get("labels", batch["input_ids"])
        mask = batch.get("attention_mask")
        teacher = None
        if self.alpha > 0:
            # before the student's forward: lifting writes into the weights that backward will read
            teacher = self.teacher_logits(ids, mask)
        logits = self(ids, mask)
        if self.alpha > 0 and self.masks is None and self.teacher_mode == "lifted":
            teacher = logits.detach()  # nothing pruned yet: the teacher is the student itself
        loss = distillation_loss(logits, labels, teacher, self.alpha, self.temperature, kl_positions=self.kl_positions)
        self.log("train/loss", loss, prog_bar=True, batch_size=ids.shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch.get("attention_mask"))
        self.val_perplexity.update(logits, batch.get("labels", batch["input_ids"]))

    def on_validation_epoch_end(self) -> None:
        nll, tokens = self.val_perplexity.totals()
        self.val_perplexity.reset()
        if tokens > 0:
            self.log("val/loss", nll / tokens, sync_dist=False)
            self.log("val/ppl", torch.exp(nll / tokens), sync_dist=False, prog_bar=True)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.student.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=tuple(hp.betas),
        )
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        warm, floor = hp.warmup_steps, hp.min_lr_ratio

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / (warm + 1)
            if hp.scheduler == "constant":
                return 1.0
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
