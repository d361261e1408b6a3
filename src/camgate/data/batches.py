"""Items -> batches of decoded samples, loaded by a bounded pool in manifest order."""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

from ..errors import ConfigError
from .decode import MaskSpec, Sample, StaticMask, load_sample
from .geometry import InputSpec
from .manifest import Item


def iter_batches(items: Iterable[Item], input_spec: InputSpec, mask_spec: MaskSpec, batch_size: int,
                 workers: int = 4, prefetch: int = 2, static_mask: str | StaticMask | None = None,
                 with_masks: bool = True, overlap: bool = True, defer_jpeg: bool = False
                 ) -> Iterator[list[Sample]]:
    """Yield lists of ``batch_size`` samples (the last may be shorter) in item order.

    Loading runs in ``workers`` threads ahead of the consumer, so fetch and decode overlap the
    model's compute. At most ``batch_size * (prefetch + 1)`` items are submitted but not yet handed
    out, so memory stays flat however many items there are. Error samples are yielded like the rest.
    ``overlap=False`` loads a batch only when the consumer asks for it (a model on the CPU needs the
    cores while it computes, see :func:`camgate.data.device.cpu_budget`). ``defer_jpeg``: see :func:`load_sample`.
    An unreadable static mask raises :class:`DataError` here, before anything is loaded.
    """
    if batch_size < 1 or workers < 1 or prefetch < 0:
        raise ConfigError("batch_size and workers must be >= 1, prefetch >= 0")
    if isinstance(static_mask, str):
        static_mask = StaticMask(static_mask)
    if static_mask is not None:
        static_mask.check(mask_spec)
    return _batches(items, input_spec, mask_spec, batch_size, workers, prefetch if overlap else 0,
                    static_mask, with_masks, overlap, defer_jpeg)


def _batches(items, input_spec, mask_spec, batch_size, workers, prefetch, static_mask, with_masks, overlap,
             defer_jpeg):
    limit = batch_size * (prefetch + 1)
    source = iter(items)
    pending: deque = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="camgate-load") as pool:
        def fill():
            while len(pending) < limit:
                item = next(source, None)
                if item is None:
                    return
                pending.append(pool.submit(load_sample, item, input_spec, mask_spec, static_mask, with_masks,
                                           defer_jpeg))

        try:
            fill()
            while pending:
                batch = [pending.popleft().result() for _ in range(min(batch_size, len(pending)))]
                if overlap:
                    fill()  # top up before handing out, so loading continues during the caller's compute
                yield batch
                if not overlap:
                    fill()
        finally:
            for f in pending:  # consumer stopped early: do not load what nobody will read
                f.cancel()
