"""What a person sees: quiet libraries, short progress lines, one-line errors.

Every command-line program of the project (launch, predict, the converters, study)
follows the same conventions, which live here:

- `quiet_native_logs()` before heavy imports, `setup_logging(verbosity)` after flag
  parsing: library INFO chatter (Orbax, TensorFlow, JAX, clu, matplotlib, grain) stays
  hidden unless `--verbosity=0` (INFO) or higher is given.
- `say(...)` prints a progress line on stdout, from process 0 only.
- `progress(...)` is a tqdm bar that draws only on a terminal (and process 0).
- `UserError` (and its `ConfigError` / `PathError` kinds) is a mistake the user can fix;
  `guarded(fn)` turns it, and any other exception, into one `error: ...` line on stderr
  and a non-zero exit status, without a traceback unless `--show_traceback` (or
  MSFF_SHOW_TRACEBACK=1) asks for one. `ConfigValueError`, a config value no run could
  use, exits 2 like a bad flag. An OS error on one of the user's paths, damaged data
  (exceptions marked `user_fixable`) and running out of memory are user errors too:
  only what is left is called unexpected, a bug to report.
- `define_common_flags(flag_values)` and `parse_flags(flag_values, argv, program)` give
  programs with their own `flags.FlagValues()` the same `--verbosity`,
  `--show_traceback` and `--help`, and one-line flag errors.
"""

from __future__ import annotations

import errno
import logging as std_logging
import os
import stat
import sys
import traceback
from typing import Callable, Iterable, Optional, Sequence

# Exit statuses: 1 for an error at run time, 2 for a command line that cannot be used.
EXIT_ERROR = 1
EXIT_USAGE = 2

# Python loggers whose INFO lines are library internals, not the user's progress.
LIBRARY_LOGGERS = ("absl", "orbax", "jax", "jax._src", "tensorflow", "matplotlib", "grain",
                   "clu", "PIL", "h5py", "urllib3", "etils", "tensorstore")


class UserError(Exception):
    """A mistake the user can fix (a flag, a config field, a path); the message says what
    to change. Printed as one line, never with a traceback."""

    exit_status = EXIT_ERROR


class ConfigError(UserError, ValueError):
    """A config field or flag value that cannot work; a ValueError for older callers."""


class ConfigValueError(ConfigError):
    """A config value no run could use, refused by the config rules before any data,
    weights or compilation: exit status 2, like a flag that does not parse."""

    exit_status = EXIT_USAGE


class PathError(UserError, FileNotFoundError):
    """A file or folder that is missing or unusable; a FileNotFoundError for older callers."""


# ----------------------------------------------------------------------------- logging


def quiet_native_logs(*, start_jax: bool = True) -> None:
    """Environment settings that must precede the first TensorFlow / XLA import:
    TensorFlow's C++ INFO and WARNING lines, and its oneDNN notice (printed before the
    log level is read, so only switching the oneDNN rewrite off hides it; TensorFlow only
    writes TensorBoard summaries here, so its numerics do not matter); and, on a machine
    without a GPU, the notices of JAX's CUDA plugin (`msff_jax.cuda_plugin`), which means
    importing JAX now. `start_jax=False` leaves that to the caller: launch.py must block
    SIGTERM (`train.preemption.install`) before JAX starts any thread."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    if start_jax:
        from msff_jax import cuda_plugin

        cuda_plugin.quiet_start()  # The CUDA plugin's notices on a machine without a GPU.


def setup_logging(verbosity: Optional[int]) -> None:
    """`verbosity` as absl counts it: None (the default) shows library warnings and
    errors only; 0 shows their INFO lines too; 1 and more shows debug lines."""
    from absl import logging as absl_logging

    if verbosity is None:
        absl_logging.set_verbosity(absl_logging.WARNING)
        level = std_logging.WARNING
    else:
        absl_logging.set_verbosity(verbosity)
        level = std_logging.INFO if verbosity <= 0 else std_logging.DEBUG
    for name in LIBRARY_LOGGERS:
        std_logging.getLogger(name).setLevel(level)
    if verbosity is None:
        # The JAX backend probe ("Unable to initialize backend 'tpu'") and matplotlib's
        # font-cache notice are warnings about the machine, not about the run.
        std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.ERROR)
        std_logging.getLogger("matplotlib").setLevel(std_logging.ERROR)
        import warnings

        warnings.filterwarnings("ignore", module="orbax")
        # Orbax logs through absl's logger, so only the file it comes from tells it apart:
        # its warnings ("did not provide metrics" on a save between evaluations) describe
        # its own bookkeeping, and its errors (tracebacks from background save threads)
        # repeat a failure that reaches the program as an exception, printed as one line.
        absl_logger = std_logging.getLogger("absl")
        if not any(isinstance(f, _LibraryWarningFilter) for f in absl_logger.filters):
            absl_logger.addFilter(_LibraryWarningFilter())


class _LibraryWarningFilter(std_logging.Filter):
    """Drops absl-logged records below CRITICAL that come from Orbax's source files."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.CRITICAL or "/orbax/" not in record.pathname


# ----------------------------------------------------------------------------- output


def _is_primary() -> bool:
    """Process 0 as jax.distributed numbered the processes. Asks no backend, so printing
    never starts one (the study driver prints and leaves the accelerators to its runs)."""
    runtime = sys.modules.get("jax._src.distributed")
    if runtime is None or runtime.global_state.client is None:  # One process.
        return True
    return runtime.global_state.process_id == 0


def say(message: str = "") -> None:
    """One progress line on stdout, from process 0 only."""
    if _is_primary():
        print(message, flush=True)


def error_line(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def progress(iterable: Optional[Iterable] = None, *, total: Optional[int] = None,
             desc: str = "", unit: str = "it", force: Optional[bool] = None):
    """A tqdm bar on stderr that draws only on a terminal and on process 0 (`force`
    overrides the terminal test); elsewhere it is a silent pass-through with the same
    `update` / `write` / `close` methods."""
    from tqdm import tqdm

    show = sys.stderr.isatty() if force is None else force
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr,
                disable=not (show and _is_primary()), dynamic_ncols=True, leave=False)


def duration(seconds: float) -> str:
    """1:02:03 / 2m05s / 7.3s: short and readable."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


# ----------------------------------------------------------------------------- errors


def traceback_wanted(flag_value: bool = False) -> bool:
    return bool(flag_value) or os.environ.get("MSFF_SHOW_TRACEBACK", "") not in ("", "0")


def traceback_asked(argv: Sequence[str]) -> bool:
    """--show_traceback as absl would read it from `argv`, for errors that come before
    (or while) the flags are parsed: the last spelling wins, --noshow_traceback and
    =false/f/0 turn it off, nothing after `--` counts."""
    asked = False
    for arg in argv:
        if arg == "--":
            break
        name, has_value, value = arg.lstrip("-").partition("=")
        if name == "show_traceback":
            asked = not has_value or value.lower() not in ("false", "f", "0")
        elif name == "noshow_traceback":
            asked = False
    return traceback_wanted(asked)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def what_is(path) -> str:
    """What is at `path`, in words ('a file', 'a folder', 'a FIFO (named pipe)', ...),
    following links; '' when nothing is there."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a symbolic link to nothing" if os.path.islink(path) else ""
    except OSError:
        return ""
    for test, words in ((stat.S_ISDIR, "a folder"), (stat.S_ISREG, "a file"),
                        (stat.S_ISFIFO, "a FIFO (named pipe)"),
                        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                        (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return words
    return "not a regular file"


def _blocking_file(path: str) -> Optional[str]:
    """The first part of `path` that exists but is not a folder (for ENOTDIR)."""
    parts = os.path.abspath(path).split(os.sep)
    for end in range(2, len(parts)):
        prefix = os.sep.join(parts[:end])
        if os.path.exists(prefix) and not os.path.isdir(prefix):
            return prefix
    return None


_FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def describe_os_error(err: OSError) -> Optional[str]:
    """One line for an OS error on a path the user chose: the path, what is wrong with it
    in plain words, and what to do. None when the error names no path."""
    if err.filename is None:
        if err.errno in _FULL_DISK:
            return ("the disk is full (or a quota or file-size limit is reached): "
                    f"{_one_line(err.strerror or err)}; free some space and rerun")
        return None
    path = os.fsdecode(err.filename)
    other = f" -> {os.fsdecode(err.filename2)}" if err.filename2 is not None else ""
    code, kind = err.errno, what_is(path)
    if code == errno.ENOENT:
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            return f"{path}{other}: no such file or folder (nor its folder {parent}); check the path"
        return f"{path}{other}: no such file or folder; check the path"
    if code in (errno.EACCES, errno.EPERM):
        said = "permission denied" if code == errno.EACCES else "operation not permitted"
        return (f"{path}{other}: {said}: this user may not use {kind or 'it'} this way (read-only "
                f"or owned by another user?); check its permissions with `ls -ld {path}`, or "
                "pass a path this user can read and write")
    if code == errno.EROFS:
        return f"{path}{other}: on a read-only file system; pass a path on a writable disk"
    if code == errno.EEXIST:
        if kind and kind != "a folder":
            return (f"{path} is {kind}, where a folder is needed; move it away or pass "
                    "another path")
        return f"{path}{other} already exists; move it away or pass another path"
    if code == errno.ENOTDIR:
        blocker = _blocking_file(path) or path
        return (f"{path}: {blocker} is {what_is(blocker) or 'not a folder'}, where a folder is "
                "needed; move it away or pass another path")
    if code == errno.EISDIR:
        return f"{path} is a folder, where a file is needed; name a file"
    if code in _FULL_DISK:
        return (f"{path}: the disk is full (or a quota or file-size limit is reached); free "
                "some space and rerun")
    if code == errno.EIO:
        return (f"{path}: input/output error (a failing disk or network file system); check the "
                "disk, or copy the data elsewhere")
    return f"{path}{other}: {_one_line(err.strerror or err)}"


def describe_exception(err: BaseException) -> tuple[str, int]:
    """(message, exit status) for an exception that reached the top of a program.
    Only our own bugs are called unexpected: a mistake the user can fix (UserError),
    an OS error on one of the user's paths, running out of memory are described as
    such."""
    if isinstance(err, UserError):
        return _one_line(err), getattr(err, "exit_status", EXIT_ERROR)
    if getattr(type(err), "user_fixable", False):
        # Packages that cannot import this module (the data pipeline, the models) mark
        # their user errors so: damaged data, weights of another model.
        text, advice = _one_line(err), getattr(type(err), "advice", "")
        if advice and advice not in text and "re-run the conversion" not in text:
            text = f"{text.rstrip('.')}; {advice}"
        return text, EXIT_ERROR
    if isinstance(err, OSError):
        described = describe_os_error(err)
        if described is None and err.errno is None:
            described = str(err)  # Raised by our code, its message naming the path.
        if described is not None:
            return _one_line(described), EXIT_ERROR
    if isinstance(err, MemoryError):
        return "out of host memory; lower the batch size or the number of workers", EXIT_ERROR
    if "RESOURCE_EXHAUSTED" in str(err):
        return ("the accelerator ran out of memory (RESOURCE_EXHAUSTED); use a smaller batch "
                "size"), EXIT_ERROR
    return (f"{_one_line(f'{type(err).__name__}: {err}')} (unexpected: rerun with "
            "--show_traceback and include its output in a bug report)"), EXIT_ERROR


def guarded(fn: Callable[[], int | None], *, show_traceback: bool = False) -> int:
    """Runs `fn`; returns its status (None -> 0), or prints one error line and returns a
    non-zero status when it raises. KeyboardInterrupt exits 130 like a shell."""
    try:
        status = fn()
        return 0 if status is None else int(status)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    except SystemExit:
        raise
    except Exception as err:  # The top of a program: everything becomes one line.
        if traceback_wanted(show_traceback):
            traceback.print_exc()
        message, status = describe_exception(err)
        error_line(message)
        return status


# ----------------------------------------------------------------------------- flags


def define_common_flags(flag_values) -> None:
    """--verbosity and --show_traceback on a program's own FlagValues."""
    from absl import flags

    flags.DEFINE_integer("verbosity", None, "Library logging: unset shows warnings and "
                         "errors only; 0 also INFO lines; 1 debug lines.", flag_values=flag_values)
    flags.DEFINE_bool("show_traceback", False, "On an error, print the Python traceback "
                      "too (for bug reports).", flag_values=flag_values)


def usage_text(flag_values, program: str, doc: str) -> str:
    return f"{doc.strip()}\n\nusage: {program} [flags]\n\n{flag_values.get_help()}\n"


def parse_flags(flag_values, argv: Optional[Sequence[str]], *, program: str,
                doc: str = "") -> list[str]:
    """Parses `argv` (without the program name) into `flag_values`; returns the
    positional arguments. `--help` prints the flags and exits 0; a bad flag prints one
    line and exits 2."""
    from absl import flags

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "-help", "--helpshort", "--helpfull") for a in argv):
        print(usage_text(flag_values, program, doc))
        raise SystemExit(0)
    flag_values.unparse_flags()
    try:
        rest = flag_values([program] + argv)
        flag_values.validate_all_flags()
    except flags.Error as err:
        error_line(f"{flag_error_text(err)} (`{program} --help` lists the flags)")
        raise SystemExit(EXIT_USAGE)
    return rest[1:]


def run_program(flag_values, argv: Optional[Sequence[str]], body: Callable[[], int | None], *,
                program: str, doc: str = "") -> int:
    """The frame every flag-parsing program shares: parse `argv`, refuse positional
    arguments, set the logging level, run `body()` guarded; returns the exit status."""
    rest = parse_flags(flag_values, argv, program=program, doc=doc)
    if rest:
        error_line(f"unexpected arguments {rest}; flags take the form --name=value")
        return EXIT_USAGE
    setup_logging(flag_values.verbosity)
    return guarded(body, show_traceback=flag_values.show_traceback)


def entry_point(main: Callable[[list[str]], int]) -> None:
    """A console script: quiet native logs, then exit with `main(sys.argv[1:])`."""
    quiet_native_logs()
    sys.exit(main(sys.argv[1:]))


def flag_error_text(err: BaseException) -> str:
    """absl's flag errors, with its wording for a missing required flag made plain."""
    import re

    text = _one_line(err)
    missing = re.search(r"Flag --(\w+) must have a value other than None", text)
    if missing:
        return f"--{missing.group(1)} is required"
    return text
