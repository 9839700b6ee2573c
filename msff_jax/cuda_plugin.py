"""JAX's CUDA plugin on a machine without a GPU.

`--mode plan` compiles for NVIDIA GPUs on any machine through JAX's CUDA plugin
(`jax-cuda12-plugin` and `jax-cuda12-pjrt`, installed with requirements.txt). Imported
on a machine without a GPU driver, the plugin prints native "could not find cuda
drivers" notices and, when JAX starts its backends, a traceback before JAX falls back to
the CPU. None of that is about the user's run, so every program of the project calls
`quiet_start()` first: without a driver it selects JAX's CPU platform (the plugin stays
registered, so plan mode still compiles for a GPU) and drops those notices, letting any
other output through. With a driver, or with JAX_PLATFORMS set by the user, it changes
nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import sys
import tempfile

PLUGIN_MODULES = ("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")
# The native lines the plugin prints when it finds no driver.
_NOTICES = ("cudart_stub.cc", "All log messages before absl::InitializeLog() is called")


def installed_plugin() -> str | None:
    """The importable CUDA plugin module, or None."""
    for name in PLUGIN_MODULES:
        try:
            if importlib.util.find_spec(name) is not None:
                return name
        except (ImportError, ValueError):
            continue
    return None


def driver_present() -> bool:
    """Whether the NVIDIA driver library loads, i.e. a GPU could be used here."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def install_advice() -> str:
    """The pip command that installs the plugin matching this JAX."""
    try:
        from importlib.metadata import version

        jax_version = version("jax")
    except Exception:  # noqa: BLE001 - advice only; a missing JAX fails elsewhere.
        jax_version = "<your jax version>"
    return (f'pip install "jax-cuda12-plugin=={jax_version}" "jax-cuda12-pjrt=={jax_version}"'
            f' (or the jax-cuda13 pair)')


@contextlib.contextmanager
def _native_stderr_without(notices):
    """Captures file descriptor 2 (native and Python writes alike) and writes back every
    line that is not one of `notices`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", errors="replace")
            kept = [line for line in text.splitlines(keepends=True)
                    if not any(notice in line for notice in notices)]
            if kept:
                os.write(2, "".join(kept).encode())


def quiet_start() -> None:
    """Imports JAX (and registers its plugins) without the plugin's driver notices, on a
    machine with the CUDA plugin and no driver. Call before anything imports JAX."""
    if "jax" in sys.modules or installed_plugin() is None or driver_present():
        return
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    with _native_stderr_without(_NOTICES):
        import jax  # noqa: F401
        from jax._src import xla_bridge

        # Registering plugins loads the plugin's library, which prints the notice once
        # more; do it now, inside the filter. (It starts no backend, so
        # jax.distributed.initialize can still come later.)
        register = getattr(xla_bridge, "_discover_and_register_pjrt_plugins", None)
        if register is not None:
            register()
