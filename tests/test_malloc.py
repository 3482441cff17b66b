"""The CLI's malloc setting (env.keep_freed_memory, ANIL_FAST_MALLOC): freed memory is reused
without page faults, the opt-out leaves malloc alone, and a bad value is a clear error."""
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from anil_fast import env
from helpers import run_cli

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# Page faults of allocating and filling 64 MiB (over glibc's largest mmap threshold, 32 MiB)
# three more times after twelve such blocks were freed (posix_memalign, as torch allocates,
# settles into reuse within ten rounds).
FAULTS = """
import resource, torch
from anil_fast import env
applied = env.keep_freed_memory()
for _ in range(12):
    x = torch.ones(1 << 24); del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    x = torch.ones(1 << 24); del x
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str | None) -> tuple[str, int]:
    """In a process of its own: mallopt would change pytest's (and the benches') malloc."""
    environ = {k: v for k, v in os.environ.items() if k != "ANIL_FAST_MALLOC"}
    if mode is not None:
        environ["ANIL_FAST_MALLOC"] = mode
    done = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True,
                          env=environ, check=True)
    applied, faults = done.stdout.split()
    return applied, int(faults)


@glibc
def test_kept_memory_is_reused_without_page_faults():
    kept, system = _faults("keep"), _faults("system")
    assert kept[0] == "True" and system[0] == "False"
    # system: each block is mmapped afresh and faulted in again (16,384 pages of 4 KiB, or 32
    # huge pages, a round); keep: freed blocks are reused
    assert system[1] >= 3 * 32, system
    assert kept[1] < system[1] / 4, (kept, system)


def test_the_opt_out_and_bad_values(monkeypatch, capsys):
    monkeypatch.setenv("ANIL_FAST_MALLOC", "system")
    assert env.keep_freed_memory() is False
    monkeypatch.setenv("ANIL_FAST_MALLOC", "jemalloc")
    with pytest.raises(ValueError, match="ANIL_FAST_MALLOC must be one of"):
        env.keep_freed_memory()
    code, out = run_cli(capsys, "cache", "info")  # refused before the command runs
    assert code == 2 and "ANIL_FAST_MALLOC must be one of ('keep', 'system'), got 'jemalloc'" in out


@glibc
def test_keep_is_the_default(monkeypatch):
    monkeypatch.delenv("ANIL_FAST_MALLOC", raising=False)
    assert env.malloc_mode() == "keep"
    assert _faults(None)[0] == "True"  # applied with the variable unset


# Three fp32 meta-steps of conv4 (28 px, 10-way 1-shot tasks, as std-5w1s trains) and the
# weights' bytes: reused memory must not change a number (a read of uninitialised memory
# would show here; fresh pages are zeroes, reused ones are not).
STEPS = """
import hashlib, sys, torch
sys.path.insert(0, sys.argv[1])
from anil_fast import env
from tests.helpers import make_trainable, random_batch
env.keep_freed_memory()
anil, opt = make_trainable(size=28, ways=10, head_init="proto")
anil.float()
for step in range(3):
    batch = random_batch(tasks=2, ways=10, shots=1, queries=5, size=28, seed=step,
                         dtype=torch.float32)
    opt.step(batch)
digest = hashlib.sha256()
for p in anil.parameters():
    digest.update(p.detach().numpy().tobytes())
print(digest.hexdigest())
"""


@glibc
def test_kept_memory_changes_no_number():
    root = str(Path(__file__).resolve().parents[1])
    digests = {mode: subprocess.run([sys.executable, "-c", STEPS, root], capture_output=True,
                                    text=True, check=True, cwd=root,
                                    env={**os.environ, "ANIL_FAST_MALLOC": mode}).stdout
               for mode in ("keep", "system")}
    assert digests["keep"] == digests["system"] and len(digests["keep"].strip()) == 64
