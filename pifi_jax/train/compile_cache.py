"""JAX's persistent compilation cache: compiled steps kept on disk, so a second run of the same
command loads them instead of compiling again.

    from pifi_jax.train import compile_cache

    compile_cache.enable(compile_cache.cache_dir_for(workdir))  # <workdir>/../.jax_cache
    with compile_cache.counting() as seen:
        ...  # jit and run
    seen.hits, seen.misses, seen.compile_seconds

`enable` keeps a cache the user chose themselves (the JAX_COMPILATION_CACHE_DIR environment
variable, or `jax_compilation_cache_dir` set any other way) and leaves its settings alone. A
cache it turns on itself stores every executable, however quick to compile or small: a training
step of a small model compiles in well under JAX's default threshold of one second, and would
otherwise never be stored.

The counters listen to the events JAX records through `jax.monitoring` (jax/_src/compiler.py,
jax/_src/compilation_cache.py and jax/_src/dispatch.py): they count, in this process, what was
compiled by XLA and what was loaded from the persistent cache. The listeners are registered once,
when this module is imported, and cost a few attribute updates per compilation.

The cache is trusted: anyone who can write to its directory can make this process run their
code (JAX's own warning), so keep it in a directory only you write to.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import jax
from jax import monitoring

# The jax.monitoring events the counters read (their names in jax 0.4.30 to 0.10).
HIT_EVENT = "/jax/compilation_cache/cache_hits"
LOOKUP_EVENT = "/jax/compilation_cache/compile_requests_use_cache"
# JAX records this one when it writes an entry (a miss that was stored).
WRITE_EVENT = "/jax/compilation_cache/cache_misses"
# The duration of XLA's compilation of one executable, or of its load on a cache hit.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

ENV_VAR = "JAX_COMPILATION_CACHE_DIR"
CACHE_DIR_NAME = ".jax_cache"

_lock = threading.Lock()
# The directory enable() itself set in jax's config (None: it has set none).
_ours: Path | None = None


def cache_dir_for(workdir: str | os.PathLike) -> Path:
    """The cache directory of a run: `.jax_cache` beside the run directory (in its parent), so
    every run under the same parent (runs/ by default) shares one cache."""
    return Path(workdir).resolve().parent / CACHE_DIR_NAME


def _user_choice() -> str | None:
    """A cache directory someone other than enable() chose, if any."""
    current = jax.config.jax_compilation_cache_dir
    if current and (_ours is None or Path(current) != _ours):
        return current
    if not current and os.environ.get(ENV_VAR):
        # Set after jax was imported, so jax has not read it: still the user's choice.
        return os.environ[ENV_VAR]
    return None


def enable(directory: str | os.PathLike) -> Path | None:
    """Turns on JAX's persistent compilation cache in `directory` (created if missing), storing
    every executable (no minimum compile time, no minimum size).

    Returns the directory compiled executables are cached in from now on:
    - `directory`, resolved;
    - the user's own directory when they chose one (JAX_COMPILATION_CACHE_DIR, or
      `jax_compilation_cache_dir` set in jax's config by other code): theirs is kept, and so
      are their thresholds (JAX's defaults skip executables compiled in under a second);
    - None when the cache is switched off (`jax_enable_compilation_cache` False, e.g.
      JAX_ENABLE_COMPILATION_CACHE=false): nothing is cached.

    Calling it again with the same directory does nothing. With another directory, the cache
    moves there: JAX opens its cache once, on the first compilation, so the open one is closed
    (`compilation_cache.reset_cache()`) and the next compilation opens the new one. Functions
    compiled before the move stay compiled in memory and are not written to the new directory.
    """
    global _ours
    with _lock:
        if not jax.config.jax_enable_compilation_cache:
            return None
        theirs = _user_choice()
        if theirs is not None:
            if not jax.config.jax_compilation_cache_dir:
                jax.config.update("jax_compilation_cache_dir", theirs)
            return Path(theirs)
        target = Path(directory).expanduser().resolve()
        if target == _ours:
            return target
        target.mkdir(parents=True, exist_ok=True)
        if _ours is not None:
            from jax.experimental.compilation_cache import compilation_cache

            compilation_cache.reset_cache()
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        # -1: no size limit, and JAX does not replace it with a filesystem-specific minimum.
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
        jax.config.update("jax_compilation_cache_dir", str(target))
        _ours = target
        return target


def active_dir() -> Path | None:
    """The persistent cache directory jax uses now (whoever set it), or None."""
    current = jax.config.jax_compilation_cache_dir
    if not current or not jax.config.jax_enable_compilation_cache:
        return None
    return Path(current)


@dataclasses.dataclass
class CacheStats:
    """What was compiled and what was loaded from the persistent cache.

    hits: executables loaded from the persistent cache instead of compiled.
    misses: executables compiled while a persistent cache directory was set (looked up there,
        not found).
    compiled: every executable XLA compiled (with or without a persistent cache).
    written: entries written to the persistent cache.
    compile_seconds: time spent in XLA compilation (the `compiled` executables).
    load_seconds: time spent loading the `hits` from the cache.
    """

    hits: int = 0
    misses: int = 0
    compiled: int = 0
    written: int = 0
    compile_seconds: float = 0.0
    load_seconds: float = 0.0

    def __sub__(self, other: CacheStats) -> CacheStats:
        return CacheStats(
            **{
                field.name: getattr(self, field.name) - getattr(other, field.name)
                for field in dataclasses.fields(self)
            }
        )

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


_totals = CacheStats()
# The stats objects the listeners update: the process totals and every open counting() block.
_live: list[CacheStats] = [_totals]
# Per thread, what happened to the compilation in progress (its events arrive in order on the
# thread that compiles: the lookup, a hit or not, then the duration).
_current = threading.local()


def _on_event(event: str, **_) -> None:
    if event == LOOKUP_EVENT:
        _current.looked_up = active_dir() is not None
    elif event == HIT_EVENT:
        _current.hit = True
    elif event == WRITE_EVENT:
        with _lock:
            for stats in _live:
                stats.written += 1


def _on_duration(event: str, duration: float, **_) -> None:
    if event != BACKEND_COMPILE_EVENT:
        return
    hit = getattr(_current, "hit", False)
    looked_up = getattr(_current, "looked_up", False)
    _current.hit = _current.looked_up = False
    with _lock:
        for stats in _live:
            if hit:
                stats.hits += 1
                stats.load_seconds += duration
            else:
                stats.compiled += 1
                stats.compile_seconds += duration
                stats.misses += int(looked_up)


monitoring.register_event_listener(_on_event)
monitoring.register_event_duration_secs_listener(_on_duration)


def stats() -> CacheStats:
    """A copy of this process's totals since pifi_jax.train.compile_cache was imported."""
    with _lock:
        return dataclasses.replace(_totals)


@contextlib.contextmanager
def counting() -> Iterator[CacheStats]:
    """Counts the compilations inside the block: the CacheStats it yields is kept up to date
    while the block runs, and holds the block's totals after it."""
    seen = CacheStats()
    with _lock:
        _live.append(seen)
    try:
        yield seen
    finally:
        with _lock:
            _live.remove(seen)
