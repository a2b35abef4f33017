"""Hostile inputs reach the native kernel in a child process: errors or sane outputs, never a crash."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from atpatch.runtime import native

SCRIPT = Path(__file__).with_name("kernel_hostile_cases.py")
pytestmark = pytest.mark.skipif(
    native.library_path() is None,
    reason="native kernel not built: run scripts/fetch_ort_headers.sh, then pip install . (or -e .)",
)


def run_cases(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONFAULTHANDLER="1")  # a crash prints where it happened
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_hostile_cases_error_cleanly_or_run() -> None:
    result = run_cases("--all")
    report = result.stdout + result.stderr[-4000:]
    assert result.returncode == 0, f"exit {result.returncode} (negative = killed by a signal):\n{report}"
    assert "FAILED" not in result.stdout, report


def test_short_random_fuzz() -> None:
    result = run_cases("--fuzz", "8", "--seed", "1234")
    report = result.stdout + result.stderr[-4000:]
    assert result.returncode == 0, f"exit {result.returncode} (negative = killed by a signal):\n{report}"


def test_a_crash_would_be_seen() -> None:
    """The harness itself: a child killed by a signal gives a non-zero return code."""
    result = subprocess.run([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"])
    assert result.returncode != 0
