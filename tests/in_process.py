"""Run a ``python -m transfer.<tool>`` command line inside the test process.

A child Python spends about 10 s importing torch, torchvision, Lightning and torchmetrics before a tool reads its
first argument; the command itself often takes under a second (a refused setting, a missing folder, a tiny run).
:func:`run_tool` calls the tool's Hydra ``main`` with the same arguments instead and returns what the child would
have: exit status, stdout and stderr (a traceback and status 1 for an uncaught exception, as the interpreter
prints them). What only a real process has (signals, ``kill -9``, DDP workers, the interpreter's own start) stays
with the subprocess tests.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import subprocess
import sys
import traceback
import warnings

import torch
from hydra.core.global_hydra import GlobalHydra


def run_tool(module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` in this process.

    Args:
        module: the tool, e.g. ``transfer.run``.
        args: its command-line arguments.
        env: environment variables for the call (``HYDRA_FULL_ERROR=0`` unless given).

    Returns:
        A ``CompletedProcess`` with the exit status and the captured stdout and stderr.
    """
    main = importlib.import_module(module).main
    saved_env, saved_argv, saved_cwd = dict(os.environ), sys.argv, os.getcwd()
    root = logging.getLogger()
    saved_handlers, saved_level, saved_threads = root.handlers[:], root.level, torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    os.environ.update({"HYDRA_FULL_ERROR": "0", **(env or {})})
    sys.argv = [module, *args]
    code: int | str | None = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            try:
                main()
            except SystemExit as exit_:
                code = exit_.code
            except BaseException:  # what the interpreter does with an uncaught exception
                traceback.print_exc()
                code = 1
    finally:
        # Hydra's job logging adds handlers (console, <job>.log) to the root logger; a run sets seeds in the
        # environment and the thread count: none of it may leak into the next test.
        for handler in root.handlers:
            if handler not in saved_handlers:
                handler.close()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        GlobalHydra.instance().clear()
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        torch.set_num_threads(saved_threads)
    status = code if isinstance(code, int) else (0 if code is None else 1)
    if isinstance(code, str):  # sys.exit("message") prints the message to stderr
        err.write(code + "\n")
    return subprocess.CompletedProcess([module, *args], status, out.getvalue(), err.getvalue())
