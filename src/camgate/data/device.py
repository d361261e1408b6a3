"""The run engine's device path: inputs on the device ahead of compute, mixed precision, batch sizing.

- :func:`prefetch` stacks each batch's inputs (in pinned memory on CUDA) and issues their copy to the
  device one batch ahead, on a side stream, so host->device transfers overlap the previous batch's
  compute. JPEGs that the loader left undecoded (``Sample.raw``) are decoded on the GPU with nvJPEG
  and preprocessed there, so decoding does not starve a fast GPU; other formats decode on the CPU.
- :func:`autocast`: optional bf16/fp16 for the model's forward and backward; maps and metrics stay
  float32 (the engine computes maps outside autocast, the runner casts what it stores).
- :class:`OomSplitter`: a batch that runs out of GPU memory is retried in halves, down to one image;
  an image that does not fit alone becomes an error row. The smaller size sticks for later batches.
- :func:`auto_batch_size`: from free GPU memory and the measured cost of one image; a fixed default
  on CPU, where memory is not the limit and a larger batch buys nothing.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import warnings
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

log = logging.getLogger(__name__)

AMP = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DECODE = ("auto", "cpu")
CPU_BATCH = 16  # --batch-size auto on CPU: the throughput plateau of resnet-class models on few cores
MAX_AUTO_BATCH = 256
MEMORY_HEADROOM = 0.8  # share of free GPU memory an automatic batch may plan to use


def check_amp(amp: str | None) -> str:
    amp = "off" if amp in (None, "", False) else str(amp).lower()
    if amp not in AMP:
        raise ConfigError(f"amp must be one of {sorted(AMP)}, got {amp!r}")
    return amp


def check_decode(decode: str | None) -> str:
    decode = (decode or "auto").lower()
    if decode not in DECODE:
        raise ConfigError(f"decode must be one of {list(DECODE)}, got {decode!r}")
    return decode


def parse_batch_size(value) -> int | str:
    """'auto' or a positive integer (CLI text or int)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"batch size must be a positive integer or 'auto', got {value!r}") from None
    if n < 1:
        raise ConfigError(f"batch size must be >= 1, got {n}")
    return n


def autocast(device: torch.device, amp: str):
    dtype = AMP[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def channels_last(model: nn.Module, device: torch.device, force: bool | None = None) -> bool:
    """Convert a conv model to channels_last on CUDA (cuDNN's fast layout for convolutions and
    tensor cores); CPU keeps the layout its kernels and the reference results were made with."""
    use = device.type == "cuda" if force is None else force
    if use and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model.to(memory_format=torch.channels_last)
        return True
    return False


# --------------------------------------------------------------------------- out of memory


def is_oom(e: BaseException) -> bool:
    # torch raises OutOfMemoryError (a RuntimeError); some kernels (cuDNN, cuBLAS) only say it in text
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def release_memory() -> None:
    gc.collect()  # the failed attempt's graph and activations, held by reference cycles
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class OomSplitter:
    """Runs ``compute(positions, targets)`` in chunks of at most ``limit``; on out-of-memory the chunk
    is retried at half the size, and an image that runs out of memory alone is passed to ``fail``."""

    def __init__(self, limit: int):
        self.limit = max(1, int(limit))
        self.halvings = 0

    def run(self, compute: Callable, todo: list[int], targets: list[int], fail: Callable) -> None:
        i = 0
        while i < len(todo):
            n = min(self.limit, len(todo) - i)
            try:
                compute(todo[i:i + n], targets[i:i + n])
                i += n
                continue
            except Exception as e:  # noqa: BLE001 - only OOM is handled here
                if not is_oom(e):
                    raise
                error = e.with_traceback(None)  # the traceback's frames hold the failed batch's tensors
            release_memory()
            if n == 1:
                fail(todo[i], error)
                i += 1
                continue
            self.limit = n // 2
            self.halvings += 1
            log.warning("out of GPU memory at batch %d: retrying in batches of %d", n, self.limit)


def batch_for_memory(free: int, fixed: int, per_image: int, cap: int = MAX_AUTO_BATCH) -> int:
    """The largest power of two whose planned use, ``fixed + b * per_image``, stays within the
    headroom of ``free`` bytes; at least 1 (the OOM splitter catches a plan that was too hopeful)."""
    budget = free * MEMORY_HEADROOM - max(fixed, 0)
    b = int(budget // max(per_image, 1)) if budget > 0 else 1
    b = max(1, min(cap, b))
    return 1 << (b.bit_length() - 1)


def auto_batch_size(device: torch.device, probe: Callable[[int], None]) -> int:
    """``probe(n)`` runs the real compute on ``n`` blank images; two probes give the memory of one
    image (the difference) and what a batch needs whatever its size (the rest)."""
    if device.type != "cuda":
        return CPU_BATCH
    peaks = []
    for n in (1, 2):
        release_memory()
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        probe(n)
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
    release_memory()
    per_image = max(peaks[1] - peaks[0], 1 << 20)
    free, _ = torch.cuda.mem_get_info(device)
    b = batch_for_memory(free, peaks[0] - per_image, per_image)
    log.info("batch size auto: %d (free %.0f MiB, %.1f MiB per image)", b, free / 2**20, per_image / 2**20)
    return b


# --------------------------------------------------------------------------- inputs on the device


def is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def jpeg_inputs(raws: list[torch.Tensor], boxes: list[tuple[int, int, int, int]], input_spec,
                device: torch.device) -> list[torch.Tensor]:
    """JPEG bytes -> model inputs (C, H, W) float32 on ``device``: nvJPEG on CUDA, libjpeg on CPU.

    Preprocessing follows :meth:`camgate.model.InputSpec.image_tensor`: crop to the box, resize
    bilinearly with antialiasing (PIL's filter), round to 8 bit as PIL does, normalise. On the CPU
    (libjpeg) inputs differ from PIL's by at most one 8-bit step (rounding in the resize); nvJPEG's
    IDCT may differ from libjpeg's by a step more (measure with ``run --decode cpu`` on a GPU)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 deprecates its image IO for torchcodec
        images = decode_jpeg(raws, mode=ImageReadMode.RGB, device=device)
    h, w = input_spec.size
    mean = torch.tensor(input_spec.mean, device=device).view(3, 1, 1)
    std = torch.tensor(input_spec.std, device=device).view(3, 1, 1)
    out = []
    for img, (left, top, right, bottom) in zip(images, boxes):
        x = img[:, top:bottom, left:right].float()
        if tuple(x.shape[-2:]) != (h, w):
            x = F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
            x = x.round_().clamp_(0, 255)
        out.append((x / 255.0 - mean) / std)
    return out


def _decode_deferred(batch: list, input_spec, device: torch.device) -> None:
    """Fill ``x`` of the samples whose JPEG the loader left undecoded (``raw``), on ``device``."""
    from .decode import decode_deferred

    todo = [s for s in batch if s.raw is not None and s.error is None]
    if not todo:
        return
    boxes = [input_spec.box(*s.size) for s in todo]
    try:
        xs = jpeg_inputs([s.raw for s in todo], boxes, input_spec, device)
    except Exception:  # noqa: BLE001 - one bad file fails the batched call: decode each on its own
        xs = []
        for s, box in zip(todo, boxes):
            try:
                xs.append(jpeg_inputs([s.raw], [box], input_spec, device)[0])
            except Exception:  # noqa: BLE001 - the CPU decoder names the problem
                xs.append(None)
    for s, x in zip(todo, xs):
        if x is None:
            decode_deferred(s, input_spec)  # CPU: a decoded input or the item's error
        else:
            s.x = x
        s.raw = None


def _to_device(tensors: list[torch.Tensor], device: torch.device, pin: bool) -> list[torch.Tensor]:
    """Those of ``tensors`` not on ``device`` yet (GPU-decoded inputs are) copied there: one stacked
    copy when they share a shape (through a pinned staging buffer when ``pin``), single copies else."""
    out = list(tensors)
    todo = [i for i, t in enumerate(tensors) if t.device != device]
    if not todo:
        return out
    first = tensors[todo[0]]
    if all(tensors[i].shape == first.shape and tensors[i].dtype == first.dtype for i in todo):
        buf = torch.empty((len(todo), *first.shape), dtype=first.dtype, pin_memory=pin)
        torch.stack([tensors[i] for i in todo], out=buf)
        for i, t in zip(todo, buf.to(device, non_blocking=True).unbind(0)):
            out[i] = t
    else:
        for i in todo:
            out[i] = (tensors[i].pin_memory() if pin else tensors[i]).to(device, non_blocking=True)
    return out


def prefetch(batches: Iterable[list], device: torch.device, input_spec=None, pin: bool | None = None
             ) -> Iterator[list]:
    """Yield each batch of samples with ``x`` (and ``mask``) on ``device``, having issued the next
    batch's transfer before handing out this one. ``pin`` (default: on CUDA) stages through pinned
    host memory, without which a non_blocking copy is synchronous."""
    cuda = device.type == "cuda"
    pin = cuda if pin is None else pin
    stream = torch.cuda.Stream(device) if cuda else None

    def stage(batch: list) -> list:
        if input_spec is not None:
            _decode_deferred(batch, input_spec, device)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for attr in ("x", "mask"):
                have = [s for s in batch if getattr(s, attr) is not None]
                for s, t in zip(have, _to_device([getattr(s, attr) for s in have], device, pin)):
                    setattr(s, attr, t)
        return batch

    def ready(batch: list) -> list:
        if stream is not None:
            current = torch.cuda.current_stream(device)
            current.wait_stream(stream)
            for s in batch:  # the side stream's memory is now used on the compute stream
                for t in (s.x, s.mask):
                    if t is not None and t.is_cuda:
                        t.record_stream(current)
        return batch

    ahead = None
    for batch in batches:
        staged = stage(batch)
        if ahead is not None:
            yield ready(ahead)
        ahead = staged
    if ahead is not None:
        yield ready(ahead)


def cpu_budget(workers: int, device: torch.device) -> tuple[int, bool]:
    """(loader threads, whether loading may overlap compute) for this device.

    On CUDA the host is free while the GPU computes: load ahead with every worker. On CPU the model
    already keeps all of torch's threads busy, so loader threads running beside it only take cores
    from it (and make its OpenMP threads spin at barriers): load between batches instead, with one
    thread per core torch uses, which decodes a batch in a fraction of its compute time."""
    if device.type == "cuda":
        return workers, True
    return max(1, min(workers, torch.get_num_threads())), False
