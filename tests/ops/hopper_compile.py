"""Shared by the sm_90 compile tests (test_flash_attention_compile.py,
test_triton_compile_hopper.py): each compiles Triton kernels for Hopper in a script run as a
subprocess, because TRITON_INTERPRET=1 (set for the session by conftest) turns @triton.jit
into the interpreter, and the script prints its findings as one JSON list on its last line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HOPPER_SMEM_BYTES = 227 * 1024   # the most one block may use on H100/H200


def run_compile_script(script: str, timeout: int, **extra_env: str) -> list:
    """Run `script` from the repo root without the interpreter; its last line, parsed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra_env)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
