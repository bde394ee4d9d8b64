"""Give freed tensor memory back to the OS, so a process's RSS follows what it holds.

PyTorch's CPU tensors come from malloc. glibc serves a request above its mmap threshold with a fresh mapping
(returned to the OS on free) and smaller ones from its heap; the threshold starts at 128 KiB and rises to the size
of every mapped block freed, up to 32 MiB. After the first big activation is freed, activations of a few MiB land
on the heap, where blocks of different lifetimes interleave and freed space cannot be returned: a training
stage's RSS grows far past its live tensors. A fixed threshold of 64 KiB (which also turns the adjustment off)
keeps every tensor above it in its own mapping, so RSS follows the live tensors -- at a price: every big
allocation is a fresh mapping whose pages the kernel faults in and zeroes, where the heap would have reused them.
Measured with ``benchmarks/step_memory.py`` (reward-model and DPO steps, 16 pairs of 64+32 tokens, budget 1024,
1 thread), the plain heap and the fixed threshold alternated twice: peak RSS 3477-3577 -> 2160 MiB (RM) and
3760-3889 -> 2401 MiB (DPO); the runs that met the same GEMM rate (162-168 GFLOP/s) took 14.9 -> 22.0 s (RM) and
16.5 -> 23.3 s (DPO) per step. So it is a choice, ``bounded_heap`` in the config (off by default), not a default.

A lighter form of the same effect is ``trim_heap`` in the config (off by default): :func:`release_heap` (glibc's
``malloc_trim``) hands the free pages inside the heap back to the OS after every micro-batch's backward pass,
every sampling batch and PPO's scoring passes, when the activations just freed are the bulk of the heap, so one
phase's freed blocks do not stay resident under the next. It bounds the RSS carried *between* passes, not the
fragmentation within one, and the returned pages are faulted in again by the next pass. Measured: the default
bench's PPO stage alone (reward model from the cache, 1 thread) peaked at 2100 MiB without and 1930 MiB with it;
an accumulated step of 6 micro-batches of 256 tokens, alternated 4 times in one process (1 thread, while a sweep
ran), took 16.0 s with and 14.6 s without (+9%).

The default, :func:`keep_heap`, goes the other way: a fixed mmap threshold of 256 MiB and a trim threshold of
1 GiB, so a freed block of any size a pass allocates (a (rows, vocabulary) logits chunk of 50 MB, a decoding
step's (64, 49152) scores, a micro-batch's activations) stays in the heap and is reused by the next one, where
glibc would unmap it (above 32 MiB always) or trim it off the heap's top and the kernel would fault in and zero
the same pages again. On this project's virtual machines a page fault costs microseconds: the rollout's entropy
pass over 256 positions took 470-580 ms with glibc's defaults and 128-135 ms with the heap kept; reward-model and
DPO steps at 256-token micro-batches 2.5 -> 2.1 s and 3.2 -> 2.5 s, peaks within 40 MiB either way
(``benchmarks/step_memory.py``, ``+keep``; results/step_memory_keep.json). The price is
bounded retention: torch allocates 64-byte aligned, and a freed block of exactly the size asked for again is too
small for the aligned request, so a loop of equal big tensors takes fresh blocks until freed neighbours merge (24
rounds of 64 MiB: 6 blocks, then reuse; tests/test_memory_bounds.py counts the page faults). What the heap holds
free at a stage's end goes back then (:func:`release_heap` with ``force``: ``malloc_trim`` ignores the trim
threshold).

**The allocator itself.** What keeps a stage's peak above its live tensors is glibc's handling of torch's
64-byte aligned requests (``posix_memalign``): glibc before 2.38 does not reuse a free chunk for an aligned
request unless it fits with its alignment slack, so a run of big tensors keeps taking fresh memory. Probed at the
PPO stage's peak (glibc's ``mallinfo2``, the method of ``benchmarks/heap_probe.py``): 0.8-1.1 GiB of live heap
blocks and 0.7-1.0 GiB of free ones kept. jemalloc reuses its size classes: the default bench peaks ~460 MiB lower under it, the same tables to the
last digit (``benchmarks/bench_speed.py``, ``env:LD_PRELOAD=...``; results/bench_speed_jemalloc.json). So the
``prefopt`` command runs itself under jemalloc where ``libjemalloc.so.2`` is installed: :func:`use_allocator`
re-executes the process (same pid, same arguments) with it preloaded before anything is imported.
``PREFOPT_MALLOC`` chooses: ``auto`` (the default: jemalloc where found), ``jemalloc`` (an error where it is
not) or ``system`` (the C library's malloc, with the thresholds above). Linux only. Under jemalloc the glibc
settings here (``bounded_heap``, ``trim_heap``) have nothing to act on.

Only on glibc; a ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` (or ``GLIBC_TUNABLES`` malloc setting)
the user set wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers
M_MMAP_THRESHOLD = -3
THRESHOLD = 64 * 1024
KEEP_MMAP_THRESHOLD = 256 * 2**20
KEEP_TRIM_THRESHOLD = 2**30


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc()
_TRIM = getattr(_LIBC, "malloc_trim", None)  # glibc only
_TRIMMING = False


def trim_heap(on: bool = True) -> None:
    """Switch :func:`release_heap` on or off for this process (the config's ``trim_heap``)."""
    global _TRIMMING
    _TRIMMING = bool(on)


def release_heap(force: bool = False) -> None:
    """With ``trim_heap`` on (or ``force``), return the free pages of the malloc heap to the OS (glibc
    ``malloc_trim(0)``; a no-op elsewhere). Called where a pass has just freed its activations; ``force`` at the
    end of a stage, whose freed tensors (a sampling pass's KV caches, a training stage's activations) would
    otherwise stay resident under the next stage's peak -- once per stage it costs nothing measurable, what
    ``trim_heap`` adds is the same call after every pass."""
    if (_TRIMMING or force) and _TRIM is not None:
        if force:
            gc.collect()  # tensors only a reference cycle still holds are freed first
        _TRIM(0)


def bound_heap(threshold: int = THRESHOLD) -> bool:
    """Fix glibc's mmap threshold (True when it was set), and the trim threshold back at glibc's 128 KiB (a
    :func:`keep_heap` earlier in the process raised it)."""
    return _set_thresholds(threshold, 128 * 1024)


def _user_malloc_settings() -> bool:
    return bool(os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_")
                or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""))


def keep_heap() -> bool:
    """Keep freed blocks in the heap for reuse (prefopt's default; see the module docstring). True when set."""
    return _set_thresholds(KEEP_MMAP_THRESHOLD, KEEP_TRIM_THRESHOLD)


def _set_thresholds(mmap: int, trim: int) -> bool:
    """glibc's mmap and trim thresholds (True when both were set), unless the user set malloc's own."""
    if _user_malloc_settings():
        return False
    try:
        return bool(_LIBC.mallopt(M_MMAP_THRESHOLD, mmap) and _LIBC.mallopt(M_TRIM_THRESHOLD, trim))
    except AttributeError:  # not glibc (musl, macOS), or no libc found: nothing to do
        return False


ALLOCATOR_ENV = "PREFOPT_MALLOC"
_REEXEC_MARK = "PREFOPT_MALLOC_REEXEC"  # set in the re-executed process: never twice
JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib64/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2")
# jemalloc runs with its own defaults (no MALLOC_CONF set), which return unused pages after ~10 s. Never returning
# them (dirty_decay_ms:-1,muzzy_decay_ms:-1) took the default bench to a 9664 MiB peak for 262 s wall against
# 1597 MiB and 282 s (one run each, 2026-12-03)


class AllocatorError(ValueError):
    """PREFOPT_MALLOC names something prefopt cannot do (mapped to a one-line error by the entry point)."""


def find_jemalloc() -> str | None:
    """Path (or soname) of an installed libjemalloc.so.2, or None."""
    for path in JEMALLOC_PATHS:
        if os.path.isfile(path):
            return path
    name = ctypes.util.find_library("jemalloc")
    return name if name and name.startswith("libjemalloc.so") else None


def allocator_env(environ: dict, jemalloc: str | None, platform: str = sys.platform) -> dict | None:
    """The environment to re-execute this process with (None: run as it is). Pure: ``environ`` is the current
    environment, ``jemalloc`` what :func:`find_jemalloc` found."""
    choice = (environ.get(ALLOCATOR_ENV) or "auto").strip().lower()
    if choice not in ("auto", "jemalloc", "system"):
        raise AllocatorError(f"{ALLOCATOR_ENV}={environ.get(ALLOCATOR_ENV)!r}: expected auto, jemalloc or system")
    if choice == "system" or environ.get(_REEXEC_MARK) or "jemalloc" in environ.get("LD_PRELOAD", ""):
        return None
    if platform != "linux" or jemalloc is None:
        if choice == "jemalloc":
            raise AllocatorError(f"{ALLOCATOR_ENV}=jemalloc: no libjemalloc.so.2 found on this {platform} machine; "
                                 "install it (Debian/Ubuntu: apt-get install libjemalloc2) or unset "
                                 f"{ALLOCATOR_ENV}")
        return None
    env = dict(environ)
    env["LD_PRELOAD"] = " ".join(p for p in (jemalloc, environ.get("LD_PRELOAD", "")) if p)
    env[_REEXEC_MARK] = "1"
    return env


def use_allocator() -> None:
    """Re-execute this process under jemalloc when :func:`allocator_env` says so (call first thing in an entry
    point: ``os.execve`` keeps the pid, so ``accelerate launch`` and signal handling see the same process).
    Where the exec fails, the run goes on with the system allocator."""
    env = allocator_env(dict(os.environ), find_jemalloc())
    if env is None:
        return
    argv = [sys.executable, *sys.orig_argv[1:]]
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, argv, env)
    except OSError:
        return


def active_allocator() -> str:
    """"jemalloc" when it is mapped into this process, else "system"."""
    try:
        with open("/proc/self/maps") as f:
            return "jemalloc" if "libjemalloc" in f.read() else "system"
    except OSError:
        return "system"
