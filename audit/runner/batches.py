"""Reading the data for the forward passes: batches of a sample range, decoded and prefetched."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from ..data import AuditDataset
from ..errors import MedauditError, ModelOutputError
from ..task import TARGET_LABEL_MAP, Task


def auto_workers(dataset: AuditDataset) -> int:
    """Decode files in worker processes; arrays already in memory (npz) are read in-process
    (on an accelerator by a prefetching thread, see :func:`prefetched`)."""
    if dataset.format == "npz" or len(dataset) < 256:
        return 0
    return max(0, min(4, (os.cpu_count() or 1) - 1))


#: One batch as the shard loop consumes it: images ``[B, C, ...]`` in ``[0, 1]``, dataset indices
#: ``[B]`` int64, and the data set's extras (``labels`` ``[B, *spatial]`` and ``spacing`` ``[B, dims]``
#: for a segmentation data set; empty otherwise), see :meth:`medaudit.data.AuditDataset.__getitem__`.
Batch = tuple[Tensor, Tensor, dict[str, Tensor]]


def prefetched(batches: Iterator[Batch], depth: int = 2) -> Iterator[Batch]:
    """``batches``, produced up to ``depth`` ahead by a background thread.

    On an accelerator the main thread only queues work, so preprocessing a batch on it (about
    1 ms per 224² image, even from memory) delays the next launch; on a thread it overlaps the
    queued work. (Worker processes did the same but cost seconds to fork and join around every
    shard.) Errors are re-raised in the consumer, in order.
    """
    slots: queue.Queue[tuple[str, object]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(message: tuple[str, object]) -> bool:
        """Put unless the consumer has gone (then the queue may stay full for ever)."""
        while not stop.is_set():
            try:
                slots.put(message, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in batches:
                if not offer(("item", item)):
                    return
            offer(("end", None))
        except BaseException as exc:  # handed to the consumer, which raises it
            offer(("error", exc))

    thread = threading.Thread(target=produce, name="medaudit-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = slots.get()
            if kind == "end":
                return
            if kind == "error":
                raise value  # type: ignore[misc]
            yield value  # type: ignore[misc]
    finally:
        stop.set()
        thread.join()


def iterate_batches(dataset: AuditDataset, start: int, stop: int, batch_size: int, num_workers: int,
                    pin_memory: bool) -> Iterator[Batch]:
    """Batches of ``dataset[start:stop]`` in order, decoded by DataLoader workers."""
    loader = DataLoader(Subset(dataset, range(start, stop)), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=pin_memory,
                        persistent_workers=False)
    try:
        for x, idx, extras in loader:
            yield x, idx.to(torch.int64), extras
    except MedauditError as exc:
        # A worker process re-raises our error with its whole traceback folded into the message;
        # the user gets the one-line message the loader wrote (the traceback is for --debug).
        text = str(exc)
        if "Original Traceback" not in text:
            raise
        last = text.strip().splitlines()[-1]
        raise type(exc)(last.split(": ", 1)[1] if ": " in last else last) from exc


def shard_batches(dataset: AuditDataset, start: int, stop: int, batch_size: int, num_workers: int,
                  device: torch.device) -> Iterator[Batch]:
    """The batches of one shard as :func:`~medaudit.runner.shard.run_shard` consumes them: pinned
    and prefetched by a thread on an accelerator when no worker processes decode them."""
    batches = iterate_batches(dataset, start, stop, batch_size, num_workers, device.type == "cuda")
    if num_workers == 0 and device.type != "cpu":
        batches = prefetched(batches)
    return batches


def device_targets(task: Task, extras: dict[str, Tensor], device: torch.device) -> dict[str, Tensor] | None:
    """The batch's label maps and spacing as :meth:`Task.reduce` takes them (int64 labels, on the
    device), for a task whose targets are label maps; None for any other task."""
    if task.targets != TARGET_LABEL_MAP:
        return None
    if "labels" not in extras:
        raise ModelOutputError(f"a {task.name} task needs a reference label map per sample, but the data set "
                               "holds none (a manifest 'mask' column, or a 'masks' array in a .npz)")
    return {"labels": extras["labels"].to(device, non_blocking=True).long(),
            "spacing": extras["spacing"].to(device, non_blocking=True)}
