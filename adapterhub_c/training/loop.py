"""The one training loop (plain LoRA training, CA-LoRA conversion, soft prompts).

``train(module, named_params, loss_fn, batches, config)`` optimises exactly the given
parameters with AdamW. Choices and defaults (``TrainConfig``):

- lr 2e-4 (the CA-LoRA reference uses 1e-4..5e-4), weight decay 0.01 (the reference's
  1e-2, applied to every trainable tensor), gradient clipping at global norm 1.0 (the
  reference uses 0.3..10; 1.0 is the common LoRA default and keeps early steps with an
  inherited LoRA from jumping), ``grad_clip=0`` turns clipping off.
- schedule ``constant`` by default (the reference's constant schedule), or ``linear``
  decay to zero at the last step; optional linear warm-up of ``warmup_steps``. The
  learning rate is a pure function of the step, so the scheduler has no state of its
  own beyond the step number stored in the checkpoint.
- one loss per step = mean of the ``grad_accum`` micro-batch losses.
- bf16 autocast on CUDA when ``bf16`` (default on); never on CPU (bit-exact resume).
- the caller places the module on ``config.device``; the loop moves batch tensors there.

Checkpoints (``checkpoint_every`` steps, at the end, and on Ctrl-C): one safetensors
file, written atomically, holding the trainable parameters, AdamW's state (flattened to
tensors), the RNG states (torch, CUDA, numpy as tensors; Python's in JSON) and, in the
file metadata, JSON with the step, the loss curve so far and the hyper-parameters.
Never pickle. ``resume=True`` continues from it and refuses (UsageError listing the
differences) when the hyper-parameters or the trainable parameters changed. On CPU an
interrupted and resumed run ends with the same weights, bit for bit, as an
uninterrupted one with the same seed: the batch order is a function of the step and
the RNG state at each step boundary is restored.

The loop runs under ``torch.random.fork_rng``: the caller's global RNG state is left as
it was. It never prints; ``progress(description, completed, total)`` reports steps.
"""
from __future__ import annotations

import contextlib
import json
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from adapterhub_c.errors import AdaptError, IntegrityError, UsageError
from adapterhub_c.fsutil import atomic_write_bytes
from adapterhub_c.options.train import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_GRAD_ACCUM,
    DEFAULT_LR,
    DEFAULT_SEED,
    DEFAULT_SEQ_LEN,
    DEFAULT_STEPS,
)
from adapterhub_c.progress import Progress
from adapterhub_c.training.batches import as_batch_source

LossFn = Callable[[dict], Any]  # -> loss tensor, or (loss tensor, {name: float})
CHECKPOINT_NAME = "checkpoint.safetensors"
FORMAT_VERSION = 1
SCHEDULES = ("constant", "linear")


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (see the module docstring for the defaults)."""

    steps: int = DEFAULT_STEPS
    lr: float = DEFAULT_LR
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    batch_size: int = DEFAULT_BATCH_SIZE
    grad_accum: int = DEFAULT_GRAD_ACCUM
    seq_len: int = DEFAULT_SEQ_LEN
    seed: int = DEFAULT_SEED
    warmup_steps: int = 0
    schedule: str = "constant"
    device: str = "cpu"
    bf16: bool = True
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY  # 0 = only at the end and on Ctrl-C
    checkpoint_dir: str | None = None  # None = no checkpoints, no resume

    # fields that do not change the result and may differ on resume
    RUNTIME_FIELDS = ("device", "checkpoint_every", "checkpoint_dir")

    def validate(self) -> None:
        """Raise UsageError on values that cannot work."""
        problems = []
        if self.steps < 0:
            problems.append(f"steps must be >= 0 (got {self.steps})")
        if not self.lr > 0:
            problems.append(f"lr must be > 0 (got {self.lr})")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0 (got {self.weight_decay})")
        if self.grad_clip < 0:
            problems.append(f"grad_clip must be >= 0 (got {self.grad_clip})")
        for name in ("batch_size", "grad_accum", "seq_len"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0 (got {self.warmup_steps})")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {', '.join(SCHEDULES)} (got {self.schedule!r})")
        if self.checkpoint_every < 0:
            problems.append(f"checkpoint_every must be >= 0 (got {self.checkpoint_every})")
        if not str(self.device).startswith(("cpu", "cuda")):
            problems.append(f"device must be cpu or cuda (got {self.device!r})")
        if problems:
            raise UsageError("invalid training options: " + "; ".join(problems))

    def hparams(self) -> dict:
        """The fields that define the result (compared on resume)."""
        return {k: v for k, v in asdict(self).items() if k not in self.RUNTIME_FIELDS}

    def lr_at(self, step: int) -> float:
        """Learning rate of the update made at ``step`` (0-based)."""
        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "linear":
            span = max(1, self.steps - self.warmup_steps)
            return self.lr * max(0.0, (self.steps - step) / span)
        return self.lr


@dataclass
class TrainResult:
    """What a run did: per-step losses and logs, throughput, and where it started."""

    steps: int
    losses: list[float] = field(default_factory=list)
    logs: list[dict] = field(default_factory=list)
    tokens: int = 0
    tokens_per_s: float = 0.0
    wall_s: float = 0.0
    resumed_from: int | None = None
    checkpoint: str | None = None

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------
# checkpoints


def _flatten_optimizer(opt: torch.optim.Optimizer, names: list[str]) -> tuple[dict, dict]:
    """AdamW state as tensors keyed ``optim.<key>.<param name>`` plus JSON-able scalars."""
    tensors, scalars = {}, {}
    state = opt.state_dict()["state"]
    for idx, entry in state.items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim.{key}.{names[idx]}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(names[idx], {})[key] = value
    return tensors, scalars


def _restore_optimizer(opt: torch.optim.Optimizer, names: list[str], tensors: dict, scalars: dict) -> None:
    sd = opt.state_dict()
    index = {name: i for i, name in enumerate(names)}
    state: dict[int, dict] = {}
    for full, t in tensors.items():
        if full.startswith("optim."):
            key, name = full[len("optim."):].split(".", 1)  # state keys have no dots
            state.setdefault(index[name], {})[key] = t
    for name, entry in scalars.items():
        state.setdefault(index[name], {}).update(entry)
    sd["state"] = state
    opt.load_state_dict(sd)  # moves the state tensors to each parameter's device


def _rng_state(device: torch.device) -> tuple[dict, dict]:
    tensors = {"rng.torch": torch.random.get_rng_state()}
    if device.type == "cuda":
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
    py_version, py_state, py_gauss = random.getstate()
    extra = {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
             "python": [py_version, list(py_state), py_gauss]}
    return tensors, extra


def _set_rng_state(tensors: dict, extra: dict, device: torch.device) -> None:
    torch.random.set_rng_state(tensors["rng.torch"])
    if device.type == "cuda":
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if states:
            torch.cuda.set_rng_state_all(states)
    kind, pos, has_gauss, cached = extra["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, state, gauss = extra["python"]
    random.setstate((version, tuple(state), gauss))


def save_checkpoint(path: Path, step: int, named: list[tuple[str, torch.nn.Parameter]],
                    opt: torch.optim.Optimizer, rng: tuple[dict, dict], hparams: dict,
                    losses: list[float], logs: list[dict]) -> None:
    """Write the checkpoint file atomically (see the module docstring)."""
    names = [n for n, _ in named]
    tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in named}
    opt_tensors, opt_scalars = _flatten_optimizer(opt, names)
    tensors.update(opt_tensors)
    tensors.update({k: v.contiguous() for k, v in rng[0].items()})
    meta = {"format_version": FORMAT_VERSION, "step": step, "hparams": hparams,
            "params": {n: list(p.shape) for n, p in named}, "optimizer": opt_scalars,
            "rng": rng[1], "losses": losses, "logs": logs}
    atomic_write_bytes(path, st_save(tensors, metadata={"adapterhub_c.checkpoint": json.dumps(meta)}))


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """(tensors, metadata) of a checkpoint file; IntegrityError when it is unreadable."""
    try:
        data = path.read_bytes()
        tensors = st_load(data)
        from safetensors import safe_open  # metadata needs the header; reading it twice is cheap

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["adapterhub_c.checkpoint"])
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise IntegrityError(f"{path}: unreadable checkpoint ({e})") from None
    return tensors, meta


def hparam_differences(saved: dict, current: dict) -> list[str]:
    """Human-readable 'name: saved → current' lines for every differing hyper-parameter."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k, '<unset>')!r} → {current.get(k, '<unset>')!r}"
            for k in keys if saved.get(k) != current.get(k)]


# ---------------------------------------------------------------------------------------
# the loop


@contextlib.contextmanager
def _defer_sigint() -> Iterator[None]:
    """Hold Ctrl-C until the block ends, so an optimizer step is never half applied."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    try:
        previous = signal.signal(signal.SIGINT, lambda *a: caught.append(a))
    except ValueError:  # not allowed here (e.g. embedded interpreter)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, dict):
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    return batch


def _count_tokens(batch: Any) -> int:
    if isinstance(batch, dict):
        if torch.is_tensor(batch.get("attention_mask")):
            return int(batch["attention_mask"].sum())
        if torch.is_tensor(batch.get("input_ids")):
            return batch["input_ids"].numel()
    return 0


def _split_loss(out: Any) -> tuple[torch.Tensor, dict]:
    if isinstance(out, tuple):
        loss, logs = out
        return loss, dict(logs or {})
    return out, {}


def _check_params(named: list[tuple[str, torch.nn.Parameter]]) -> None:
    names = [n for n, _ in named]
    if not named:
        raise UsageError("nothing to train: the list of trainable parameters is empty")
    if len(set(names)) != len(names):
        raise UsageError("trainable parameter names must be unique")
    frozen = [n for n, p in named if not p.requires_grad]
    if frozen:
        raise AdaptError(f"parameters given to train do not require grad: {', '.join(frozen[:5])}")


def train(module: torch.nn.Module, named_params: Sequence[tuple[str, torch.nn.Parameter]],
          loss_fn: LossFn, batches: Any, config: TrainConfig | None = None, *,
          progress: Progress | None = None, resume: bool = False,
          fingerprint: dict | None = None) -> TrainResult:
    """Train ``named_params`` of ``module`` on ``batches`` with ``loss_fn``; see the module docstring.

    ``batches``: a ``BatchSource`` (random access, e.g. ``batches.make_batches``), a list
    of batch dicts (cycled), or an iterable. ``fingerprint``: extra settings (dataset,
    rank, …) stored with the hyper-parameters and compared on resume. ``resume=True``
    with no checkpoint file yet starts afresh (``result.resumed_from`` is None).
    ``loss_fn(batch)`` returns the loss, or ``(loss, {name: float})`` logged per step.
    """
    config = config or TrainConfig()
    config.validate()
    named = list(named_params)
    _check_params(named)
    source = as_batch_source(batches)
    device = torch.device(config.device)
    hparams = config.hparams()
    hparams["fingerprint"] = fingerprint or {}
    ckpt_path = Path(config.checkpoint_dir) / CHECKPOINT_NAME if config.checkpoint_dir else None
    if resume and ckpt_path is None:
        raise UsageError("resume needs a checkpoint folder (checkpoint_dir)")

    params = [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    cuda_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        step, losses, logs = 0, [], []
        resumed_from = None
        if resume and ckpt_path.is_file():
            step, losses, logs = _resume(ckpt_path, named, opt, hparams, device)
            resumed_from = step
        else:
            torch.manual_seed(config.seed)
            if device.type == "cuda":
                torch.cuda.manual_seed_all(config.seed)
            random.seed(config.seed)
            np.random.seed(config.seed % 2**32)
        result = TrainResult(steps=config.steps, losses=losses, logs=logs, resumed_from=resumed_from,
                             checkpoint=str(ckpt_path) if ckpt_path else None)
        _run(module, named, opt, loss_fn, source, config, hparams, step, result, ckpt_path, device, progress)
    return result


def _resume(path: Path, named, opt, hparams: dict, device: torch.device) -> tuple[int, list, list]:
    tensors, meta = read_checkpoint(path)
    diffs = hparam_differences(meta["hparams"], hparams)
    if diffs:
        raise UsageError("cannot resume: the options differ from the checkpoint's ("
                         + "; ".join(diffs) + "); start afresh without --resume or use the same options")
    shapes = {n: list(p.shape) for n, p in named}
    if meta["params"] != shapes:
        changed = sorted(set(meta["params"]) ^ set(shapes)) or \
            sorted(n for n in shapes if meta["params"].get(n) != shapes[n])
        raise UsageError("cannot resume: the trainable parameters differ from the checkpoint's "
                         f"({', '.join(changed[:5])})")
    with torch.no_grad():
        for n, p in named:
            p.copy_(tensors[f"param.{n}"].to(p.device, p.dtype))
    _restore_optimizer(opt, [n for n, _ in named], tensors, meta["optimizer"])
    _set_rng_state(tensors, meta["rng"], device)
    return int(meta["step"]), list(meta["losses"]), list(meta["logs"])


def _run(module, named, opt, loss_fn, source, config: TrainConfig, hparams: dict, start: int,  # noqa: PLR0913 - one training run's state, passed once from train()
         result: TrainResult, ckpt_path: Path | None, device: torch.device, progress) -> None:
    params = [p for _, p in named]
    autocast = device.type == "cuda" and config.bf16
    was_training = module.training
    module.train()
    tokens, t0 = 0, time.perf_counter()
    step = start

    def checkpoint(at_step: int, rng) -> None:
        if ckpt_path is not None:
            save_checkpoint(ckpt_path, at_step, named, opt, rng, hparams, result.losses, result.logs)

    try:
        while step < config.steps:
            begun, rng_at_start = step, _rng_state(device)  # what a checkpoint of `step` must hold
            try:
                for g in opt.param_groups:
                    g["lr"] = config.lr_at(step)
                opt.zero_grad(set_to_none=True)
                total, step_logs = 0.0, {}
                for micro in range(config.grad_accum):
                    batch = _to_device(source.batch(step * config.grad_accum + micro), device)
                    with (torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()):
                        loss, logs = _split_loss(loss_fn(batch))
                    if not torch.isfinite(loss.detach()).all():
                        raise AdaptError(f"the loss is not finite at step {step + 1} ({float(loss)})")
                    (loss / config.grad_accum).backward()
                    total += float(loss.detach()) / config.grad_accum
                    for k, v in logs.items():
                        step_logs[k] = step_logs.get(k, 0.0) + float(v) / config.grad_accum
                    tokens += _count_tokens(batch)
                with _defer_sigint():
                    if config.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                    opt.step()
                    step += 1
                    result.losses.append(total)
                    result.logs.append(step_logs)
                if progress:
                    progress("training", step, config.steps)
                if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
                    checkpoint(step, _rng_state(device))
            except KeyboardInterrupt:
                # parameters and optimizer are as after `step` updates; a step cut short
                # leaves no trace but the RNG, which goes back to the state at its start
                checkpoint(step, rng_at_start if step == begun else _rng_state(device))
                raise
        checkpoint(step, _rng_state(device))
    finally:
        module.train(was_training)
        opt.zero_grad(set_to_none=True)
        result.wall_s = time.perf_counter() - t0
        result.tokens = tokens
        result.tokens_per_s = tokens / result.wall_s if result.wall_s > 0 else 0.0

