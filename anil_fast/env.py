"""One home for the environment and files every layer needs: the `ANIL_FAST_*` variables, the
user cache folder, data roots, CPU feature flags, atomic writes and verified cache entries.

Nothing here imports the rest of the package, so the op layer, the kernels' report and the
data layer all take these from one place.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import re
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from anil_fast.errors import InputError

# Every environment variable anil-fast reads (docs/reference/environment.md's table is checked
# against this).
ENV_VARS = {
    "ANIL_FAST_DATA": "folder holding the datasets (omniglot/, mini-imagenet/, cifar100/ ...); "
                      "searched after an explicit --data-root, before the user cache",
    "ANIL_FAST_CACHE": "the user cache folder (decoded images, C++ build, kernel report); "
                       "default ~/.cache/anil_fast",
    "ANIL_FAST_OFFLINE": "1: never try a download (ResNet18 weights, Omniglot, CIFAR-100)",
    "ANIL_FAST_EXTENSIONS": "where the C++ small loop is built; default <cache>/extensions",
    "ANIL_FAST_DIST_TIMEOUT": "seconds before a torch.distributed collective times out "
                              "(default 300)",
    "ANIL_FAST_ALLOW_NO_CPP": "1: the tests accept a machine without a C++ compiler (the fused "
                              "op's batched-torch fallback)",
    "ANIL_FAST_MALLOC": "keep (default): the CLI makes glibc's malloc keep the memory a step "
                        "frees for the next one; system: leave malloc as it is",
}


def _variable(name: str) -> str | None:
    assert name in ENV_VARS, name  # every variable read is documented
    value = os.environ.get(name)
    return value if value else None


def cache_dir() -> Path:
    """The user cache folder (ANIL_FAST_CACHE, default ~/.cache/anil_fast)."""
    return Path(_variable("ANIL_FAST_CACHE") or Path.home() / ".cache" / "anil_fast")


def extensions_dir() -> Path:
    return Path(_variable("ANIL_FAST_EXTENSIONS") or cache_dir() / "extensions")


def offline() -> bool:
    return _variable("ANIL_FAST_OFFLINE") == "1"


def allow_no_cpp() -> bool:
    return _variable("ANIL_FAST_ALLOW_NO_CPP") == "1"


def dist_timeout_s() -> float:
    return float(_variable("ANIL_FAST_DIST_TIMEOUT") or 300)


def data_roots(folder: str, root=None) -> list[Path]:
    """Where a dataset's files are looked for, in order: `root`, $ANIL_FAST_DATA/<folder>, the
    user cache's <folder>."""
    roots = [Path(root)] if root is not None else []
    if _variable("ANIL_FAST_DATA"):
        roots.append(Path(_variable("ANIL_FAST_DATA")) / folder)
    roots.append(cache_dir() / folder)
    return roots


# -- the CPU -----------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _cpuinfo() -> str | None:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return None


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    found = re.search(r"^model name\s*:\s*(.+)$", _cpuinfo() or "", re.M)
    return found.group(1).strip() if found else platform.processor() or platform.machine()


@lru_cache(maxsize=None)
def cpu_flags() -> frozenset | None:
    """The CPU's instruction-set flags (/proc/cpuinfo "flags" or Arm "Features"); None when
    they cannot be read."""
    text = _cpuinfo()
    if text is None:
        return None
    flags = set()
    for line in re.findall(r"^(?:flags|Features)\s*:(.*)$", text, re.M):
        flags.update(line.split())
    return frozenset(flags) or None


def cpu_has_native_bf16() -> bool | None:
    """Whether this CPU computes bf16 natively (x86 AVX-512 BF16 or AMX, Arm BF16); None when
    its flags cannot be read. Without it, bf16 convolutions are emulated and slow."""
    flags = cpu_flags()
    return None if flags is None else bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def cpu_key() -> str:
    """A short key of this CPU's instruction sets: a -march=native build cached in a folder
    shared between machines must not be handed from one machine to another."""
    import hashlib
    flags = cpu_flags()
    text = " ".join(sorted(flags)) if flags else platform.processor()
    return f"{platform.machine()}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def physical_memory_bytes() -> int | None:
    """This machine's physical memory (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_allocation(what: str, nbytes: int, hint: str) -> None:
    """Refuse, before allocating, `nbytes` of host memory for `what` beyond half of this
    machine's physical memory."""
    total = physical_memory_bytes()
    if total is not None and nbytes > total // 2:
        raise InputError(f"{what} would need {nbytes / 2**30:.1f} GiB of memory; the limit is half "
                         f"of this machine's {total / 2**30:.1f} GiB; {hint}")


# -- host memory -------------------------------------------------------------------------------
MALLOC_MODES = ("keep", "system")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's <malloc.h>


def malloc_mode() -> str:
    mode = _variable("ANIL_FAST_MALLOC") or "keep"
    if mode not in MALLOC_MODES:
        raise InputError(f"ANIL_FAST_MALLOC must be one of {MALLOC_MODES}, got {mode!r}")
    return mode


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse: no mmap for large blocks (M_MMAP_MAX 0)
    and no trimming of the heap's free top below 2 GiB (M_TRIM_THRESHOLD). Returns whether
    it was applied: not with ANIL_FAST_MALLOC=system, nor off glibc (macOS, musl, Windows).

    Why: by default a freed activation over the mmap threshold (or the heap's free top) goes
    back to the kernel, and the next step page-faults and zeroes it again. A CPU meta-step
    allocates the same tensors every step; keeping them made std-5w1s train 1.14x as fast in
    fp32 (2-core Zen 5 held to AVX2), for about 0.2 GiB more peak memory, held until the
    process ends (docs/how-to/benchmark.md, "Host memory on the CPU"). The CLI calls
    this at start; API users may call it themselves. Numbers do not change."""
    if malloc_mode() == "system" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1


# -- files -------------------------------------------------------------------------------------
def atomic_write(target, write) -> None:
    """write(binary file) into a unique temporary file beside `target`, then rename it over
    `target`: a killed process or a full disk leaves the previous file intact, and the partial
    file is removed. The file's mode follows the umask, as open() would give it. OSErrors propagate (callers say what they mean for them)."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would ignore the umask
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_stamp(path: Path) -> str:
    """What a decode cache keys one source file on without reading it: its size, modification
    time, inode change time and inode number. The change time is set by the kernel on every
    write and cannot be set back from user space (touch and copy tools restore modification
    times only), so an edited file never matches its old stamp."""
    st = path.stat()
    return f"{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"


def decode_cache_dirs() -> list[Path]:
    """The folders of decoded images (rebuilt from their sources on demand): what
    `anil-fast cache clear` deletes. Downloads and the C++ build are kept."""
    return [cache_dir() / "decoded", cache_dir() / "omniglot" / "decoded"]


def current_umask() -> int:
    """The process's umask (os.umask can only be read by setting it: set and restore)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def parse_json(text: str):
    """json.loads for files a user may hand us: JSON nested too deeply for the parser is a
    ValueError, as any other malformed JSON, instead of a RecursionError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply to read") from None


def checksum(array: np.ndarray) -> str:
    """A cryptographic digest of the array's bytes (BLAKE2b): a rewritten cache entry cannot
    be made to match it, as it could a CRC."""
    return hashlib.blake2b(memoryview(np.ascontiguousarray(array)).cast("B"), digest_size=32).hexdigest()


def read_cached_array(entry: Path, expect: dict | None = None):
    """(array, record) of a cache entry (entry.npy + entry.json), verified against its record
    (shape, dtype, checksum, and the record's fields named in `expect`) before it is served;
    None when there is none or it fails a check (the caller rebuilds it)."""
    images_file, meta_file = entry.with_suffix(".npy"), entry.with_suffix(".json")
    if not (images_file.exists() and meta_file.exists()):
        return None
    try:
        meta = parse_json(meta_file.read_text())
        array = np.load(images_file, allow_pickle=False)
        if (list(array.shape) != meta["shape"] or str(array.dtype) != meta["dtype"]
                or checksum(array) != meta["blake2b"]
                or any(meta.get(k) != v for k, v in (expect or {}).items())):
            return None
    except Exception:  # a broken or tampered cache entry is rebuilt, never trusted
        return None
    return array, meta


def write_cached_array(entry: Path, array: np.ndarray, meta: dict) -> None:
    """Write the array, then its record (shape, dtype, checksum), each atomically: a killed or
    concurrent process never leaves a half-written entry. A read-only or full cache folder
    only costs the next load its decoding time."""
    meta = {**meta, "shape": list(array.shape), "dtype": str(array.dtype), "blake2b": checksum(array)}
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(entry.with_suffix(".npy"), lambda f: np.save(f, array))
        atomic_write(entry.with_suffix(".json"), lambda f: f.write(json.dumps(meta).encode()))
    except OSError:
        pass


def read_cached_json(path: Path):
    """A JSON cache file's value, or None when it is missing or unreadable."""
    try:
        return parse_json(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_cached_json(path: Path, value) -> None:
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: f.write(json.dumps(value).encode()))
    except OSError:
        pass  # a read-only cache only costs the next run its work
