"""Train GLIPv2. Runs alone (`python -m training.train`) or under torchrun (DDP: gloo on
CPU, nccl on GPU). Exact resume: a run killed at any moment and restarted continues from
its last checkpoint to the same weights as a run that never stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from glipv2.checkpoint import (FORMAT, CheckpointError, atomic_save, init_weights, load_model_weights, model_state,
                               read_checkpoint)
from glipv2.config import LossConfig, ModelConfig, get_preset
from glipv2.modeling.glipv2 import GLIPv2, build_model
from glipv2.text import Tokenizer
from training.batch import Batch, Collator, TextFeatureCache
from training.data import GroundingSample
from training.sources import ConcatSamples, build_datasets
from training.distributed import DistInfo, all_reduce_mean, init_distributed
from training.losses import GLIPv2Loss
from training.run_log import RunLog


@dataclass
class TrainConfig:
    preset: str = "tiny"
    out_dir: str = "runs/tiny"
    # "shapes" draws the shapes world on the fly from seeds; otherwise a comma-separated
    # list of KIND:ANNOTATIONS:IMAGES with KIND in {coco, grounding}.
    train_data: str = "shapes"
    data_seed: int = 0
    grounding_fraction: float = 0.5
    # Share of shapes grounding samples that also name shapes in the plural ("circles":
    # every circle), the words count questions use ("how many circles are there?").
    plural_phrases: float = 0.0
    # Share of shapes grounding samples that get two more relation phrases ("the red star
    # left of the blue cross"), about 1 in 15 phrases otherwise.
    relation_phrases: float = 0.0
    val_dir: str = ""  # a generated split to evaluate on ("" = no evaluation)
    val_images: int = 200
    batch_size: int = 16  # per process, per micro-step
    grad_accum: int = 1
    max_steps: int = 2000
    # Minutes of training (evaluations included) after which the run ends as if at
    # max_steps: the cosine schedule follows whichever of steps and time is further along,
    # so a run on a slower or busier machine still ends annealed, on time. 0 = steps only.
    time_budget_min: float = 0.0
    warmup_steps: int = 100
    lr: float = 2e-3
    weight_decay: float = 0.05
    min_lr_ratio: float = 0.02
    grad_clip: float = 5.0
    eval_every: int = 0  # steps; 0 = only at the end
    save_every: int = 250
    keep_last: int = 3
    log_every: int = 10
    amp: str = "auto"  # auto: bf16 on CUDA (fp16 + GradScaler where bf16 is missing); "off"; "bf16"; "fp16"
    device: str = "auto"
    threads: int = 0  # torch CPU threads; 0 = leave the default
    workers: int = 1  # data-loading processes
    seed: int = 0
    text_cache: int = 20000  # cached prompt features of a frozen text encoder
    init_from: str = ""  # checkpoint whose weights a new run starts from (heads it lacks start fresh)
    loss: LossConfig = field(default_factory=LossConfig)
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides, e.g. {"image_hw": [128, 128]}

    def __post_init__(self) -> None:
        if isinstance(self.loss, dict):
            self.loss = LossConfig(**self.loss)
        for name in ("batch_size", "grad_accum", "max_steps", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1 (got {getattr(self, name)})")
        for name in ("grounding_fraction", "plural_phrases", "relation_phrases"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"TrainConfig.{name} must be in [0, 1] (got {getattr(self, name)})")
        if self.amp not in ("auto", "off", "bf16", "fp16"):
            raise ValueError(f"TrainConfig.amp must be auto, off, bf16 or fp16 (got {self.amp!r})")

    def model_config(self) -> ModelConfig:
        cfg = get_preset(self.preset).replace(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.model.items()})
        if self.loss.vqa > 0 or self.loss.caption > 0:
            if self.train_data != "shapes":
                raise ValueError("VQA and caption training read their labels from the shapes world; "
                                 "set loss.vqa and loss.caption to 0 for other training data")
            from training.vocab import shapes_checked_phrases

            answers, tokens, words = _vocabularies(self.data_seed, cfg.max_tokens)
            captions = self.loss.caption > 0
            cfg = cfg.replace(vqa_answers=answers if self.loss.vqa > 0 else (),
                              caption_tokens=tokens if captions else (),
                              caption_words=words if captions else (),
                              caption_checked_phrases=shapes_checked_phrases() if captions else ())
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@functools.lru_cache(maxsize=4)
def _vocabularies(seed: int, max_tokens: int) -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]:
    from training.vocab import shapes_vocabularies

    return shapes_vocabularies(seed, Tokenizer(max_tokens=max_tokens))


# --------------------------------------------------------------------------- schedule


def lr_factor(step: int, cfg: TrainConfig, time_fraction: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio at max_steps (or at the end of
    the time budget, when time_fraction, the share of it used, is further along)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = max((step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps), time_fraction)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class TrainClock:
    """Training seconds so far, carried across resumes in the checkpoint."""

    def __init__(self, budget_min: float, spent: float = 0.0) -> None:
        self.budget = budget_min * 60.0
        self.spent, self.start = spent, time.perf_counter()

    def seconds(self) -> float:
        return self.spent + time.perf_counter() - self.start

    def fraction(self) -> float:
        return self.seconds() / self.budget if self.budget > 0 else 0.0

    def done(self) -> bool:
        return self.budget > 0 and self.seconds() >= self.budget


# The box refiner (glipv2.modeling.box_refine) starts from nothing in a run that fine-tunes
# everything else (the demo's second stage) and has only that run to learn in: its
# parameters take this multiple of the run's learning rate. In 200 steps of stage 2 at the
# run's own rate its loss still followed the head's box loss (nothing gained); trained
# alone at 4x that rate it had cut the sides' error from 4.2 to 3.1 px by step 200.
REFINER_LR_SCALE = 4.0


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float) -> list[dict[str, Any]]:
    """No weight decay on norms, biases and scalars (log_scale, bias0, layer scales); the box
    refiner's parameters at REFINER_LR_SCALE x lr."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        groups.setdefault((p.ndim > 1, name.startswith("box_refiner.")), []).append(p)
    # (decay, refiner): the two groups of a model without a refiner come first, in the order
    # they always had, so the optimizer state of its earlier checkpoints still resumes.
    order = [(True, False), (False, False), (True, True), (False, True)]
    return [{"params": groups[key], "weight_decay": weight_decay if key[0] else 0.0,
             "lr": lr * (REFINER_LR_SCALE if key[1] else 1.0)}
            for key in order if key in groups]


# ------------------------------------------------------------------------------- data


class MicroBatches(torch.utils.data.Dataset):
    """Item j = the j-th micro-batch of this rank, fully determined by j: the data position
    to resume from is just the step count."""

    def __init__(self, samples: Any, collate: Collator, batch_size: int, rank: int, world: int, seed: int) -> None:
        self.samples, self.collate = samples, collate
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed

    def __len__(self) -> int:
        return sys.maxsize

    def indices(self, j: int) -> list[int]:
        first = (j * self.world + self.rank) * self.batch_size
        return [self.samples.index(first + b, self.seed) for b in range(self.batch_size)]

    def __getitem__(self, j: int) -> Batch:
        samples: list[GroundingSample] = [self.samples[i] for i in self.indices(j)]
        return self.collate(samples, step_seed=self.seed * 1_000_003 + j * self.world + self.rank)


class _Range(torch.utils.data.Sampler):
    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


# ------------------------------------------------------------------------ checkpoints


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.out_dir) / "checkpoints"


def latest_checkpoint(cfg: TrainConfig) -> Path | None:
    found = sorted(checkpoint_dir(cfg).glob("step_*.pt"))
    return found[-1] if found else None


def readable_checkpoint(cfg: TrainConfig, announce: bool = True) -> tuple[Path | None, dict[str, Any] | None]:
    """The newest checkpoint that reads back, and its contents. A newer one that does not
    (truncated by a full disk, a copy cut short) is set aside as step_*.pt.unreadable with
    a warning, and the one before it is used: a run loses the steps since that one, never
    the whole run."""
    for path in sorted(checkpoint_dir(cfg).glob("step_*.pt"), reverse=True):
        try:
            return path, read_checkpoint(path)
        except CheckpointError as e:
            if announce:
                print(f"warning: {e}; resuming from the checkpoint before it", file=sys.stderr)
                with contextlib.suppress(OSError):
                    path.rename(path.with_name(path.name + ".unreadable"))
    return None, None


def _prune(cfg: TrainConfig) -> None:
    for old in sorted(checkpoint_dir(cfg).glob("step_*.pt"))[: -cfg.keep_last]:
        old.unlink(missing_ok=True)


# ------------------------------------------------------------------------------- loop


def _device(cfg: TrainConfig, info: DistInfo) -> torch.device:
    if cfg.device != "auto":
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def _amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.amp == "off" or (cfg.amp == "auto" and device.type != "cuda"):
        return None
    if cfg.amp == "fp16" or (cfg.amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


# Fields that change what a resumed run trains on or how: resuming with another value
# would silently give a run that matches neither setting. max_steps is not among them:
# raising it is how a finished run is trained further.
RESUME_FIELDS = ("batch_size", "grad_accum", "lr", "weight_decay", "warmup_steps", "min_lr_ratio", "train_data",
                 "data_seed", "grounding_fraction", "plural_phrases", "relation_phrases", "seed", "loss")


class RunFinished(Exception):
    """The run's newest checkpoint is already at max_steps: nothing to train."""


def check_inputs(cfg: TrainConfig) -> None:
    """Everything a run reads later exists now: a run should not train for an hour and
    then fail on a missing validation split."""
    if cfg.val_dir:
        from training.evaluate import check_split

        check_split(cfg.val_dir)
    if cfg.init_from and not Path(cfg.init_from).is_file():
        raise FileNotFoundError(f"--init-from {cfg.init_from}: checkpoint not found")


def check_resume(saved: dict[str, Any], cfg: TrainConfig, world_size: int, path: Path) -> None:
    """Refuse to resume with settings that change the training itself (see RESUME_FIELDS)."""
    ours = cfg.to_dict()
    changed = [f"{k}: {saved[k]!r} -> {ours[k]!r}" for k in RESUME_FIELDS if k in saved and saved[k] != ours[k]]
    saved_world = saved.get("world_size", world_size)
    if saved_world != world_size:  # each rank reads its own share of every batch
        changed.append(f"processes: {saved_world} -> {world_size}")
    if changed:
        raise CheckpointError(f"{path} was trained with other settings ({'; '.join(changed)}); resume with the "
                              "same ones, pass --allow-changed-config to continue anyway, or use a new --out-dir")


def training_samples(cfg: TrainConfig, understanding: bool) -> ConcatSamples:
    """The run's training data (understanding: with questions and captions)."""
    return build_datasets(cfg.train_data, cfg.data_seed, cfg.grounding_fraction, understanding, cfg.plural_phrases,
                          cfg.relation_phrases)


def train(cfg: TrainConfig, allow_changed_config: bool = False) -> dict[str, Any]:
    """Run (or resume) training; returns the final metrics. Raises RunFinished when the
    run's newest checkpoint is already at max_steps."""
    check_inputs(cfg)
    device_hint = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device
    info = init_distributed(device_hint)
    device = _device(cfg, info)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)

    model_cfg = cfg.model_config()
    model = build_model(model_cfg).to(device)
    if cfg.loss.mlm <= 0:
        # A head no loss trains is frozen: DDP then needs no search for unused parameters.
        model.mlm_head.requires_grad_(False)
    if cfg.loss.box_refine <= 0 and model.box_refiner is not None:
        model.box_refiner.requires_grad_(False)
    tokenizer = Tokenizer(max_tokens=model_cfg.max_tokens)
    understanding = bool(model_cfg.vqa_answers or model_cfg.caption_tokens)
    samples = training_samples(cfg, understanding)
    mlm_on = cfg.loss.mlm > 0
    collate = Collator(tokenizer, model_cfg.image_hw, cfg.loss.mlm_fraction if mlm_on else 0.0, cfg.loss.mlm_probability,
                       model_cfg.vqa_answers, model_cfg.caption_tokens, model_cfg.caption_max_len)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.lr), lr=cfg.lr, betas=(0.9, 0.999))
    if cfg.time_budget_min > 0 and info.world_size > 1:
        # Each process's clock would end its run (and set its learning rate) on its own.
        raise ValueError("time_budget_min is for single-process runs; use max_steps with several processes")
    clock = TrainClock(cfg.time_budget_min)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, clock.fraction()))
    amp_dtype = _amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    step, best = 0, None
    resume_from, ckpt = readable_checkpoint(cfg, announce=info.is_main)
    if resume_from is not None:
        if ckpt.get("model_config") != model_cfg.to_dict():
            raise CheckpointError(f"{resume_from} was trained with another model config; use a new --out-dir")
        if ckpt["step"] >= cfg.max_steps or (cfg.time_budget_min > 0
                                             and ckpt.get("train_seconds", 0.0) >= 60 * cfg.time_budget_min):
            raise RunFinished(f"{cfg.out_dir} is finished: step {ckpt['step']} of {cfg.max_steps} "
                              f"({resume_from}). Nothing to train; raise --max-steps to train further, or use a "
                              "new --out-dir for a new run")
        if not allow_changed_config:
            check_resume({**ckpt.get("train_config", {}), "world_size": _world_of(ckpt)}, cfg, info.world_size,
                         resume_from)
        load_model_weights(model, model_cfg, ckpt["model"], f"checkpoint {resume_from}")
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        rng = ckpt["rng"]
        _set_rng_state(rng[info.rank % len(rng)] if isinstance(rng, list) else rng)
        step, best = ckpt["step"], _best_score(cfg, ckpt.get("best"))
        clock.spent = ckpt.get("train_seconds", 0.0)
    elif cfg.init_from:
        init_weights(model, model_cfg, cfg.init_from)

    step_module = TrainingStep(model, GLIPv2Loss(cfg.loss, _anchors_per_level(model_cfg)))
    # Losses run inside DDP's forward (the MLM head and the contrastive loss use parameters
    # too). Every loss that is on keeps its parameters in the graph even on a batch where it
    # has nothing to train (a zero term), and a head whose loss is off is frozen, so every
    # trainable parameter gets a gradient at every step: no unused-parameter search (and no
    # DDP warning about a search that found nothing). Only the detection losses switched
    # off leave trainable parameters without a gradient.
    find_unused = any(getattr(cfg.loss, k) <= 0 for k in ("grounding", "box_giou", "centerness"))
    ddp = (DistributedDataParallel(step_module, find_unused_parameters=find_unused)
           if info.world_size > 1 else None)
    net = ddp or step_module
    text_cache = TextFeatureCache(model.encode_text, cfg.text_cache) if model_cfg.freeze_text else None
    data = MicroBatches(samples, collate, cfg.batch_size, info.rank, info.world_size, cfg.data_seed)
    loader = torch.utils.data.DataLoader(
        data, batch_size=None, sampler=_Range(step * cfg.grad_accum, cfg.max_steps * cfg.grad_accum),
        num_workers=cfg.workers, persistent_workers=False, prefetch_factor=2 if cfg.workers else None,
        # Its own generator: a loader draws its workers' base seed when iterated, and a draw
        # from the global RNG here would shift a resumed run's stream (dropout) by one.
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    log = RunLog(Path(cfg.out_dir), enabled=info.is_main, resumed_at=step)
    if info.is_main:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out_dir) / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    progress = log.progress(total=cfg.max_steps, initial=step)
    batches = iter(loader)
    model.train()
    t_last, images_since = time.perf_counter(), 0
    metrics: dict[str, Any] = {}
    if info.is_main and step:
        print(f"resuming {cfg.out_dir} from {resume_from} (step {step} of {cfg.max_steps})", file=sys.stderr)
    clock.start = time.perf_counter()
    final = False
    while not final:
        optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            batch = next(batches).to(device)
            text = None
            if text_cache is not None:
                unmasked = None if batch.mlm_labels is None else (batch.mlm_labels < 0).all(1).tolist()
                text = text_cache(batch.input_ids, batch.attention_mask, unmasked)
            question = None
            if text_cache is not None and batch.question_ids is not None:
                question = text_cache(batch.question_ids, batch.question_mask)
            # Gradients are all-reduced once per optimizer step, not per micro-batch.
            sync = ddp is None or micro == cfg.grad_accum - 1
            with (contextlib.nullcontext() if sync else ddp.no_sync()):
                losses = net(batch, text, question, amp_dtype)
                scaler.scale(losses["total"] / cfg.grad_accum).backward()
            for k, v in losses.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
            images_since += batch.images.shape[0] * info.world_size
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if not torch.isfinite(grad_norm):
            raise FloatingPointError(f"step {step}: gradient norm is {grad_norm}; lower --lr or check the data")
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        step += 1
        final = step == cfg.max_steps or clock.done()
        progress.update(1)
        progress.set_postfix(loss=f"{totals['total']:.3f}")

        if step % cfg.log_every == 0 or final:
            now = time.perf_counter()
            record = {k: all_reduce_mean(torch.tensor(v)).item() for k, v in totals.items()}
            record.update(step=step, lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm),
                          images_per_s=images_since / max(now - t_last, 1e-9))
            if text_cache is not None:
                record["text_cache_hit_rate"] = text_cache.hits / max(1, text_cache.hits + text_cache.misses)
            log.train(record)
            t_last, images_since = now, 0
        # Save before evaluating: an evaluation that fails must not cost the training.
        if step % cfg.save_every == 0 or final:
            save_checkpoint(checkpoint_dir(cfg) / f"step_{step:08d}.pt", model, model_cfg, optimizer, scheduler,
                            scaler, step, best, cfg, metrics, rank=info.rank, world=info.world_size,
                            train_seconds=clock.seconds())
        if cfg.val_dir and info.is_main and ((cfg.eval_every and step % cfg.eval_every == 0) or final):
            metrics = evaluate_model(model, tokenizer, cfg)
            model.train()
            log.eval(step, metrics)
            score = metrics.get("shape_ap50", 0.0) + metrics.get("colour_ap50", 0.0)
            if best is None or score > best:
                best = score
                save_checkpoint(Path(cfg.out_dir) / "best.pt", model, model_cfg, optimizer, scheduler, scaler,
                                step, best, cfg, metrics, train_seconds=clock.seconds())
    progress.close()
    log.close()
    return metrics


class TrainingStep(torch.nn.Module):
    """Forward pass and losses as one module, so DDP sees every parameter use."""

    def __init__(self, model: GLIPv2, loss_fn: GLIPv2Loss) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Batch, text: torch.Tensor | None, question: torch.Tensor | None,
                amp_dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """text / question: cached features of the prompts / questions (None = encode here)."""
        model = self.model
        device_type = batch.images.device.type
        with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            # One backbone pass serves every task of the batch.
            feats = model.visual(batch.images)
            if text is None:
                text = model.encode_text(batch.input_ids, batch.attention_mask)
            colours = model.cell_colours(batch.images) if model.cfg.grounding_appearance else None
            out = model.detect_features(feats, text, batch.attention_mask, colours)
            answers = captions = None
            if model.vqa_head is not None or model.caption_decoder is not None:
                looks = model.appearance(batch.images, feats)
            extremes = None
            if model.vqa_head is not None and batch.question_ids is not None:
                if question is None:
                    question = model.encode_text(batch.question_ids, batch.question_mask)
                if model.vqa_head.extremes is not None and batch.objects is not None:
                    answers, extremes = model.answer(feats, looks, question, batch.question_mask,
                                                     with_extremes=True)
                else:
                    answers = model.answer(feats, looks, question, batch.question_mask)
            if model.caption_decoder is not None and batch.caption_in is not None:
                captions = model.caption_decoder(model.caption_memory(batch.images, feats, looks), batch.caption_in)
        losses = self.loss_fn(model, _float_outputs(out), batch)
        cfg = self.loss_fn.cfg
        if answers is not None and cfg.vqa > 0:
            # Multi-label BCE over the answer vocabulary, scaled by its size as in VQA v2 practice.
            bce = F.binary_cross_entropy_with_logits(answers.float(), batch.answer_scores)
            losses["vqa"] = cfg.vqa * bce * answers.shape[1]
            if extremes is not None:
                losses["objectness"] = cfg.vqa * self.loss_fn.objectness(model, extremes.objectness.float(),
                                                                         batch.objects)
                losses["extreme_gate"] = cfg.vqa * self.loss_fn.extreme_gate(extremes.gate.float(),
                                                                             batch.question_extremes)
        if captions is not None and cfg.caption > 0:
            losses["caption"] = cfg.caption * F.cross_entropy(captions.float().flatten(0, 1), batch.caption_out.flatten())
        losses["total"] = sum(v for k, v in losses.items() if k != "total")
        return losses


def _float_outputs(out):
    """Losses run in fp32 whatever the autocast dtype of the forward pass."""
    if out.logits.dtype == torch.float32:
        return out
    h = out.head
    head = type(h)(*(t.float() for t in (h.box_deltas, h.centerness, h.regions, h.tokens, h.token_bias, h.fused_text)))
    return type(out)(out.boxes.float(), out.logits.float(), out.centerness.float(), head)


def _world_of(ckpt: dict[str, Any]) -> int:
    """How many processes wrote a checkpoint (each rank's RNG state is kept)."""
    return len(ckpt["rng"]) if isinstance(ckpt.get("rng"), list) else 1


def _best_score(cfg: TrainConfig, resumed: float | None) -> float | None:
    """The step checkpoint is written before the evaluation of its step, so best.pt may
    hold a newer best score than the checkpoint a run resumes from."""
    path = Path(cfg.out_dir) / "best.pt"
    if not path.is_file():
        return resumed
    theirs = read_checkpoint(path).get("best")
    return theirs if resumed is None or (theirs is not None and theirs > resumed) else resumed


def _anchors_per_level(cfg: ModelConfig) -> list[int]:
    h, w = cfg.image_hw
    return [h * w for h, w in cfg.level_hw]


def save_checkpoint(path: Path, model: GLIPv2, model_cfg: ModelConfig, optimizer, scheduler, scaler, step: int,
                    best: float | None, cfg: TrainConfig, metrics: dict[str, Any], rank: int = 0, world: int = 1,
                    train_seconds: float = 0.0) -> None:
    rng = _rng_state()
    if world > 1:  # every rank's RNG, so each resumes its own stream
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, rng)
        rng = gathered
    if rank != 0:
        return
    atomic_save({
        "format": FORMAT,
        "model_config": model_cfg.to_dict(),
        "model": model_state(model, model_cfg),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "step": step,
        "train_seconds": train_seconds,
        "best": best,
        "rng": rng,
        "train_config": cfg.to_dict(),
        "metrics": metrics,
    }, path)
    if path.parent == checkpoint_dir(cfg):
        _prune(cfg)


def evaluate_model(model: GLIPv2, tokenizer: Tokenizer, cfg: TrainConfig) -> dict[str, Any]:
    from glipv2.predict import TorchPredictor
    from training.evaluate import evaluate_detection

    predictor = TorchPredictor(model, tokenizer)
    return evaluate_detection(predictor.predict, cfg.val_dir, max_images=cfg.val_images, progress=False)


# -------------------------------------------------------------------------------- CLI


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def field_values(items: Sequence[str], flag: str) -> dict[str, Any]:
    """["FIELD=VALUE", ...] -> {field: value}, each value JSON when it parses, else the text."""
    out = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"{flag} expects FIELD=VALUE, got {item!r}")
        out[name] = _parse_value(raw)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__)
    p.add_argument("--config", help="JSON file of TrainConfig fields (command-line flags win)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("loss", "model"):
            continue
        default = f.default
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=type(default), default=None,
                       help=f"default: {default}")
    for f in dataclasses.fields(LossConfig):
        p.add_argument(f"--loss-{f.name.replace('_', '-')}", dest=f"loss.{f.name}", type=type(f.default),
                       default=None, help=f"LossConfig.{f.name} (default: {f.default})")
    p.add_argument("--model", action="append", default=[], metavar="FIELD=VALUE",
                   help='override a ModelConfig field, e.g. --model image_hw=[128,128] (repeatable)')
    p.add_argument("--allow-changed-config", action="store_true",
                   help="resume even when batch size, learning rate, data or loss settings differ from the "
                        "checkpoint's (refused otherwise)")
    return p


def config_from_args(argv: Sequence[str] | None = None) -> TrainConfig:
    return _parse(argv)[0]


def _parse(argv: Sequence[str] | None) -> tuple[TrainConfig, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = json.loads(Path(args.config).read_text()) if args.config else {}
    loss = dict(values.pop("loss", {}))
    model = dict(values.pop("model", {}))
    for key, v in vars(args).items():
        if v is None or key in ("config", "model", "allow_changed_config"):
            continue
        if key.startswith("loss."):
            loss[key[5:]] = v
        else:
            values[key] = v
    try:
        model.update(field_values(args.model, "--model"))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    return TrainConfig(**values, loss=LossConfig(**loss), model=model), args


def _results(out_dir: Path) -> str:
    names = ["best.pt", "metrics.jsonl", "curves.png", "tensorboard"]
    return ", ".join(str(out_dir / n) for n in names if (out_dir / n).exists())


def main(argv: Sequence[str] | None = None) -> int:
    is_main = int(os.environ.get("RANK", "0")) == 0
    cfg = None
    try:
        cfg, args = _parse(argv)
        cfg.model_config()  # validate overrides before any work
        metrics = train(cfg, allow_changed_config=args.allow_changed_config)
    except RunFinished as e:
        if is_main:
            print(f"{e}\nresults: {_results(Path(cfg.out_dir))}", file=sys.stderr)
        return 0
    except (ValueError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if is_main:
            last = latest_checkpoint(cfg) if cfg is not None else None
            where = (f"the newest checkpoint is {last}; rerun the same command to resume from it" if last else
                     "no checkpoint was written yet (one every --save-every steps); rerun to start again")
            print(f"\ninterrupted: {where}", file=sys.stderr)
        return 130
    if metrics and is_main:
        from training.evaluate import format_table

        print(format_table(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
