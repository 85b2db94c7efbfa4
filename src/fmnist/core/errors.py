"""What users see when something stops a command: the exceptions (a problem with their input,
not a bug in fmnist; a stop) and the way a path is written in a one-line message or a hint."""

import os
import shlex


class UserError(Exception):
    """Bad arguments, missing or corrupt data, unreadable images.

    The CLI prints ``error: <message>`` (plus ``hint: <hint>`` when given) and
    exits with status 2, without a traceback.
    """

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers send before a kill), raised while training runs and taken like
    Ctrl-C; the CLI exits 143 for it, 130 for Ctrl-C."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during training; the run folder keeps the last complete epoch's checkpoint."""

    def __init__(self, run_dir, epochs_done: int, signal_name: str = "SIGINT"):
        kept = (f"checkpoint of epoch {epochs_done} kept in {run_dir}" if epochs_done
                else f"no epoch had completed; {run_dir} restarts from epoch 1")
        super().__init__(f"{signal_name}: stopped after {epochs_done} complete epoch(s); {kept}")
        self.run_dir, self.signal_name = run_dir, signal_name


def shell_path(path) -> str:
    """A path as one argument of a command to paste into a shell (a hint): quoted when it has
    spaces or quotes, and never read as an option ('-x' becomes './-x'). A name with control
    characters or bytes that are not UTF-8 is written in bash's $'...' quoting, byte by byte,
    so the hint stays one line and names the very folder."""
    text = str(path)
    text = f"./{text}" if text.startswith("-") else text
    if text.isprintable():  # the bytes of a name that is not UTF-8 are read as surrogates: not printable
        return shlex.quote(text)
    return "$'" + "".join(_ansi_c_byte(byte) for byte in os.fsencode(text)) + "'"  # the bytes on disk


_ANSI_C_ESCAPES = {ord("\\"): "\\\\", ord("'"): "\\'", ord("\n"): "\\n", ord("\t"): "\\t", ord("\r"): "\\r"}


def _ansi_c_byte(byte: int) -> str:
    if byte in _ANSI_C_ESCAPES:
        return _ANSI_C_ESCAPES[byte]
    return chr(byte) if 0x20 <= byte < 0x7F else f"\\x{byte:02x}"


def one_line(text: str) -> str:
    """``text`` for a one-line message: characters that are not printable (a newline or an
    escape in a folder name, bytes of a name that are not UTF-8) written as Python escapes."""
    return "".join(c if c.isprintable() else _escaped(c) for c in str(text))


def _escaped(character: str) -> str:
    if "\udc80" <= character <= "\udcff":  # a byte of a name that is not UTF-8 (os.fsdecode's surrogateescape)
        return f"\\x{ord(character) - 0xDC00:02x}"
    return character.encode("unicode_escape").decode("ascii")
