"""Host allocator settings for the evaluation phase of a ``medaudit run``.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves blocks above its *mmap
threshold* (128 KiB, raised dynamically as blocks are freed) with a fresh ``mmap`` and returns
freed memory at the top of the heap to the system above its *trim threshold*; both mean that the
next tensor of the same size can be new memory whose every 4 KiB page faults on first touch. The
evaluation allocates megabyte-sized temporaries in tight loops (bootstrap chunks), and on a
2-core machine the page faults took longer than the arithmetic: the OOD measures of one detector
chunk took 5.3 ms with the defaults and 1.8 ms with the settings below.

The forward passes keep glibc's defaults on purpose: with the settings below from the start, a
DenseNet121 forward loop ran ~12 % faster, but the medium-sized activations and perturbation
temporaries then fragment the heap around the per-batch outputs the runner keeps, and a
10,000-sample audit peaked at 1.7 GiB instead of 0.94 GiB.

Only the command line asks for :func:`tune_malloc` (through ``run_audit(tune_allocator=True)``,
after the forward passes; a library must not change its host's allocator), and it acts only on
glibc and not when the user has chosen allocator settings: any ``MALLOC_*`` environment
variable, ``glibc.malloc`` tunables in ``GLIBC_TUNABLES``, or a replacement allocator in
``LD_PRELOAD`` leaves malloc as configured.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
import os

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "malloc_tunable", "tune_malloc"]

#: Blocks below this come from the heap and are reused; glibc's largest allowed value on 64-bit.
MMAP_THRESHOLD = 32 << 20
#: Free memory kept at the top of the heap instead of being returned (and faulted in again).
TRIM_THRESHOLD = 256 << 20

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _user_configured(environ: Mapping[str, str]) -> bool:
    if any(key.startswith("MALLOC_") for key in environ):
        return True
    if "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""):
        return True
    preload = environ.get("LD_PRELOAD", "")
    return any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc"))


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):  # no confstr (Windows) or no such name (macOS, musl)
        return False


def malloc_tunable(environ: Mapping[str, str] | None = None) -> bool:
    """Whether :func:`tune_malloc` would act: glibc, and no allocator settings chosen by the user."""
    return _glibc() and not _user_configured(os.environ if environ is None else environ)


def tune_malloc(environ: Mapping[str, str] | None = None) -> bool:
    """Set glibc's mmap and trim thresholds for this process; returns whether it did.

    A no-op (``False``) off glibc, when ``mallopt`` is unavailable or refuses a value, and when
    the environment shows the user configured the allocator (see the module docstring).
    """
    if not malloc_tunable(environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; both are plain integers within glibc's limits
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
