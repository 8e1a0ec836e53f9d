"""Running vLLM's Python as a child process, for the tests in this folder (conftest.py's fixtures use it too)."""

import os
import subprocess
import tempfile

VLLM_PYTHON = os.environ.get("MOEQUANT_VLLM_PYTHON", "/tmp/vllm-venv/bin/python")
VLLM_ENV = {
    "PYTHONSAFEPATH": "1",  # the repository's kernels/ folder stays off sys.path
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine in the child itself
}


def run_vllm(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a script or `-c` code with vLLM's Python, in a temporary folder."""
    return subprocess.run(
        [VLLM_PYTHON, *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **VLLM_ENV}, cwd=tempfile.gettempdir(),
    )  # fmt: skip
