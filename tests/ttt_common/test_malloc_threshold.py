"""`pin_malloc_mmap_threshold`: large CPU temporaries keep going to mmap after a big block was freed.

Checked through glibc's own counters (`mallinfo2().hblks`, the number of mmapped blocks) in a fresh
process, because the threshold is process-wide. Without the pin, freeing a 24 MiB tensor raises
glibc's dynamic threshold and the next 8 MiB tensors come from the heap (hblks unchanged), which is
what fragmented the heap while caching backbone outputs.
"""

import ctypes.util
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None,
                                reason="glibc only")

PROBE = textwrap.dedent("""
    import ctypes, ctypes.util, sys, torch
    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallinfo2"):
        print("no-mallinfo2"); sys.exit(0)
    libc.mallinfo2.restype = MallInfo2
    if sys.argv[1] == "pin":
        from ttt_common.train_utils import pin_malloc_mmap_threshold
        assert pin_malloc_mmap_threshold()
    big = torch.empty(24 * 2**20 // 4)
    del big
    before = libc.mallinfo2().hblks
    kept = [torch.empty(8 * 2**20 // 4) for _ in range(8)]
    print(libc.mallinfo2().hblks - before)
""")


def _mmapped_blocks_after_big_free(mode: str) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_pinned_threshold_keeps_large_temporaries_mmapped():
    unpinned = _mmapped_blocks_after_big_free("none")
    if unpinned == "no-mallinfo2":
        pytest.skip("glibc < 2.33 has no mallinfo2")
    assert int(unpinned) == 0, "glibc's dynamic threshold should have moved 8 MiB blocks to the heap"
    assert int(_mmapped_blocks_after_big_free("pin")) == 8
