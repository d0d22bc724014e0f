"""TensorFlow's native start-up lines, hidden unless asked for.

Importing TensorFlow prints lines from C++ before any log level applies (oneDNN notes,
"Could not find cuda drivers", "failed call to cuInit" on a CPU machine), and so does
its first look at the devices. mixer_jax uses TensorFlow only to read data, so
`install()` (run when the package is imported) makes the process's first
`import tensorflow` send native stderr to a temporary file (shown if the import
fails) and keeps TensorFlow off GPUs there, where it would otherwise reserve
accelerator memory that JAX needs. Nothing is imported early: a program that never
reads data never imports TensorFlow. `MIXER_JAX_DEBUG=1` or `--verbose` on the
command line leaves the import alone.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import sys
import tempfile

DEBUG_ENV = "MIXER_JAX_DEBUG"


def verbose_requested(argv=None) -> bool:
    """Whether `--verbose` is on the command line or MIXER_JAX_DEBUG is set (not '' or '0')."""
    argv = sys.argv if argv is None else argv
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        return True
    return any(a in ("--verbose", "--verbose=true", "--verbose=1") for a in argv[1:])


@contextlib.contextmanager
def native_stderr_hidden():
    """Inside the block, writes to file descriptor 2 go to a temporary file, which is
    replayed if the block raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        uninstall()
        with native_stderr_hidden():
            self._loader.exec_module(module)
            try:  # TF only feeds data: it must never take accelerator memory from JAX
                module.config.set_visible_devices([], "GPU")
            except (AttributeError, RuntimeError):
                pass

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _QuietTensorflowFinder(importlib.abc.MetaPathFinder):
    # Called for availability checks too (`importlib.util.find_spec`), which import
    # nothing: the finder stays until the module is executed.
    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        uninstall()
        try:
            spec = importlib.util.find_spec(name)
        finally:
            install()
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


_FINDER = _QuietTensorflowFinder()


def install() -> None:
    """Makes the first `import tensorflow` quiet (unless verbose or already imported)."""
    if "tensorflow" in sys.modules or verbose_requested() or _FINDER in sys.meta_path:
        return
    sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
