"""The ``qru`` command: the parser (one module per command group, each with its ``add_*`` functions
and ``cmd_*`` handlers) and :func:`main`, which maps errors caused by the input to one line.
Nothing in qru imports this package."""
from __future__ import annotations

import argparse
import os
import pickle
import sys
import traceback
from pathlib import Path

from qru.cli.data import add_data
from qru.cli.demo import add_demo, add_sweep
from qru.cli.evaluate import add_eval
from qru.cli.quant import add_quantize, add_survival
from qru.cli.tools import add_convert, add_doctor, add_smoke
from qru.cli.train import add_pretrain, add_unlearn
from qru.io import check_device

# --- registry --------------------------------------------------------------------------

_ADDERS = [add_smoke, add_doctor, add_eval, add_data, add_pretrain, add_unlearn, add_demo, add_sweep,
           add_survival, add_quantize, add_convert]


def build_parser() -> argparse.ArgumentParser:
    from qru import __version__

    parser = argparse.ArgumentParser(prog="qru", description="Quantization-robust LLM unlearning.")
    parser.add_argument("--version", action="version", version=f"qru {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _ADDERS:
        add(sub)
    return parser


# --- errors ----------------------------------------------------------------------------

# Library functions that read a user's file, and the local variable holding its path: an error
# raised inside one of them (a corrupt torch.save / safetensors file) is reported naming the file.
_READERS = {("serialization.py", "load"): "f", ("torch.py", "load_file"): "filename"}


def _file_being_read(e: BaseException) -> str | None:
    tb, name = e.__traceback__, None
    while tb is not None:
        code = tb.tb_frame.f_code
        var = _READERS.get((Path(code.co_filename).name, code.co_name))
        if var is not None and isinstance(tb.tb_frame.f_locals.get(var), (str, os.PathLike)):
            name = os.fspath(tb.tb_frame.f_locals[var])
        tb = tb.tb_next
    return name


def _expected_error(e: BaseException) -> str | None:
    """The one-line message for an error caused by the user's input, or None for a bug."""
    from safetensors import SafetensorError

    from qru.eval.precision import PrecisionUnavailable

    if isinstance(e, PrecisionUnavailable):
        return str(e)
    if isinstance(e, OSError):
        if e.filename is not None:
            return f"{e.filename}: {e.strerror or e}"
        return str(e)
    if isinstance(e, (pickle.UnpicklingError, EOFError, SafetensorError, RuntimeError)):
        # never torch's advice to load with weights_only=False: the file is damaged, not unsafe
        first = str(e).splitlines()[0].split(". ")[0][:160] if str(e) else ""
        detail = "" if isinstance(e, pickle.UnpicklingError) or not first else f": {first}"
        f = _file_being_read(e)
        if f is not None:
            return f"{f}: corrupt or unreadable file ({type(e).__name__}{detail})"
        if isinstance(e, RuntimeError):
            return None
        return f"corrupt or unreadable file ({type(e).__name__}{detail})"
    if isinstance(e, ValueError):  # CheckpointError, ConfigError, AdapterError, TrainConfigError, DataError, ...
        return " ".join(str(e).split()) or type(e).__name__
    return None


def _check_device(args) -> None:
    """A bad ``--device`` fails before any work, naming the option (:func:`qru.io.check_device`)."""
    name = getattr(args, "device", None)
    if name is not None:
        check_device(str(name))


def main(argv: list[str] | None = None) -> int:
    """Run a command. Errors caused by the input print one line ``qru <command>: error: ...`` and
    exit 2; anything else is a bug: its traceback, under a line asking to report it, exit 1."""
    args = build_parser().parse_args(argv)
    cmd = " ".join(filter(None, [args.command, getattr(args, "data_command", None)]))
    try:
        _check_device(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("qru: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - sorted into expected and unexpected below
        msg = _expected_error(e)
        if msg is not None:
            print(f"qru {cmd}: error: {msg}", file=sys.stderr)
            return 2
        print(f"qru {cmd}: internal error: this is a bug in qru; please report it with the traceback below",
              file=sys.stderr)
        traceback.print_exc()
        return 1
