"""Runs a pytest file of this folder in a subprocess with simulated CPU devices."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEVICE_COUNT = 8


def run_checks(filename: str, *pytest_args: str, devices: int = DEVICE_COUNT):
  """pytest HERE/filename with `devices` CPU devices; returns the CompletedProcess."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={devices}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             str(HERE / filename), *pytest_args]
  return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)


def assert_checks_pass(filename: str, *pytest_args: str) -> None:
  result = run_checks(filename, *pytest_args)
  summary = (result.stdout + result.stderr)[-12000:]
  assert result.returncode == 0, f"{filename} on {DEVICE_COUNT} CPU devices failed:\n{summary}"
