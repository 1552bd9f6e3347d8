"""Suite-wide test setup.

Triton's interpreter (TRITON_INTERPRET=1, the only way its kernels run without a GPU) must be on
when `triton.language` is first imported: its built-in helpers (`tl.sum`, ...) are jitted at import
time, interpreted or compiled for good. Without CUDA we import it once here with the variable set,
then restore the environment, so nothing else in the suite sees the variable; the Triton tests set it
only while they run (`tests/official_port/test_triton_ops.py`, `tests/lact/test_triton_update.py`;
kernels are jitted lazily per value).
"""

import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("triton") is not None and not torch.cuda.is_available():
    _saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    finally:
        if _saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _saved


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-shape tests: several times faster, above all on a shared
    machine (use with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
