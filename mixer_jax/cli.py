"""What every mixer_jax command line shares: a quiet start, one-line user errors, --verbose.

  python -m mixer_jax.main ...      # and convert, predict, benchmark: all run through `run`

- Known user errors (`errors.UserError` and its subclasses, absl flag errors, a misspelt
  `--config.<key>`) print one line, `error: <message>`, and exit with status 2.
  `--verbose` or `MIXER_JAX_DEBUG=1` also prints their traceback. Any other exception is
  a bug and keeps its traceback (exit status 1).
- The default console shows what mixer_jax itself says (INFO and up) and other libraries'
  warnings; TensorFlow's C++ start-up lines (CUDA probing on a CPU machine, oneDNN notes)
  are hidden (`native_logs`).
  `--verbose` shows everything (and the config).
"""
from __future__ import annotations

import logging as py_logging
import os
import re
import sys
import traceback
from typing import Callable, NoReturn, Sequence

from absl import app, flags, logging

from mixer_jax.errors import ConfigError, UserError
from mixer_jax.native_logs import DEBUG_ENV, verbose_requested

USER_ERROR_STATUS = 2
_VERBOSE_FLAG = "verbose"
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def define_verbose_flag(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    if _VERBOSE_FLAG not in flag_values:
        flags.DEFINE_bool(_VERBOSE_FLAG, False, "Show everything: library logs, the config, "
                          f"tracebacks of user errors (also: {DEBUG_ENV}=1).",
                          flag_values=flag_values)


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """`flag_values(argv)`, with bad flags and misspelt `--config.<key>`s raised as UserErrors."""
    define_verbose_flag(flag_values)
    if flag_values is flags.FLAGS:
        app.define_help_flags()  # --help, --helpfull, as app.run gives them
    try:
        return flag_values(list(argv))
    except flags.Error as e:
        raise FlagError(str(e)) from e
    except (KeyError, AttributeError) as e:  # ml_collections' override of an unknown key
        raise ConfigError(_override_message(e)) from e


def with_config_paths(argv: Sequence[str], flag: str = "config") -> list[str]:
    """`argv` with `--config=<shipped name>` (or `--config <name>`) turned into that config's
    file (`train_config.config_path`), so shipped configs work from any folder."""
    from mixer_jax import train_config

    out, argv = [], list(argv)
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{flag}="):
            arg = f"--{flag}=" + train_config.config_path(arg.partition("=")[2])
        elif i and argv[i - 1] == f"--{flag}":
            arg = train_config.config_path(arg)
        out.append(arg)
    return out


class FlagError(UserError, ValueError):
    """A command-line flag that is unknown, missing or has a bad value."""


def _override_message(error: BaseException) -> str:
    """ml_collections' error for an unknown key (its text nested in reprs:
    `\'total_step\'\\nDid you mean ...`) as one readable sentence."""
    text = str(error.args[0] if error.args else error)
    text = text.replace("\\n", "\n").replace("\\'", "'")
    key = re.search(r"[A-Za-z_][\w.]*", text)
    hint = re.search(r"Did you mean[^\n]*\?", text)
    message = f"Unknown config key --config.{key.group(0) if key else text}"
    return f"{message}. {hint.group(0)}" if hint else f"{message}."


def one_line(error: BaseException) -> str:
    """The error's message with its line breaks joined (lists become `; `-separated)."""
    lines = [line.strip(" -") for line in str(error).splitlines() if line.strip(" -")]
    if not lines:
        return type(error).__name__
    head, rest = lines[0], lines[1:]
    return head + (" " + "; ".join(rest) if rest else "")


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None, *,
        flag_values: flags.FlagValues | None = None) -> NoReturn:
    """Runs `main(args)` as a program and exits: with main's return value (None: 0), with
    status 2 and one line for a user error, with a traceback for anything else.

    With `flag_values`, `args` are what is left of `argv` once they are parsed; without,
    `main` gets `argv` and parses its own flags (with `parse_flags`).
    """
    argv = list(sys.argv if argv is None else argv)
    verbose = verbose_requested(argv)
    logging.use_absl_handler()
    logging.set_verbosity(logging.INFO)
    quiet_library_logs(verbose)
    try:
        args = argv if flag_values is None else parse_flags(argv, flag_values)
        if not flags.FLAGS.is_parsed():  # a private FlagValues: absl's log needs this
            flags.FLAGS.mark_as_parsed()
        status = main(args)
    except (UserError, app.UsageError) as error:
        if verbose:
            traceback.print_exc()
        print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_STATUS)
    sys.exit(status or 0)


# ---------------------------------------------------------------------------- quiet logs


class _OursOrWarnings(py_logging.Filter):
    """mixer_jax's own records at any level; other libraries' from WARNING up, except
    tfds' notes about datasets mixer_jax builds itself (nothing is downloaded)."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        if record.pathname.startswith(_PACKAGE_DIR):
            return True
        if f"{os.sep}tensorflow_datasets{os.sep}" in record.pathname:
            return record.levelno >= py_logging.ERROR
        return record.levelno >= py_logging.WARNING


OURS_OR_WARNINGS = _OursOrWarnings()


class _ShortFormatter(py_logging.Formatter):
    """`12:03:04 message`; `WARNING`/`ERROR` spelt out (absl's full prefix with --verbose)."""

    def __init__(self):
        super().__init__("%(asctime)s %(message)s", datefmt="%H:%M:%S")

    def format(self, record: py_logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= py_logging.WARNING:
            time, _, message = text.partition(" ")
            return f"{time} {record.levelname}: {message}"
        return text


def quiet_library_logs(verbose: bool = False) -> None:
    """Hides other libraries' INFO chatter (jax's backend probing, tfds readers, orbax's
    dozen lines per checkpoint) from the absl log and shortens its prefix; `verbose`
    keeps absl's format and everything."""
    handler = logging.get_absl_handler()
    if verbose:
        handler.removeFilter(OURS_OR_WARNINGS)
        handler.setFormatter(logging.PythonFormatter())
    else:
        handler.addFilter(OURS_OR_WARNINGS)
        handler.setFormatter(_ShortFormatter())
