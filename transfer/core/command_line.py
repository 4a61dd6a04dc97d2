"""The command line, checked before Hydra runs the tool: composition errors as one paragraph and exit status 2.

Hydra reports an unknown key, an unknown option of a config group or an override it cannot parse with its own
message and exit status 1, and for a typo'd key it suggests ``+key=value``, which would hand a component an
argument it does not take. :func:`checked_command_line` composes the tool's config from the command line first
(about 0.2 s per composition, no Lightning or torch import) and turns those failures into the project's error
form: what was wrong, the closest valid names, how to fix it, exit status 2. Each option of a swept group
(``-m model=resnet18,alexnet``) is composed on its own, so a bad one is caught before the first job starts.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, Override
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException
from omegaconf import DictConfig

from transfer.core.errors import ConfigError, full_errors_requested, print_error
from transfer.core.overrides import quote_path_overrides

F = TypeVar("F", bound=Callable[..., Any])
# Flags after which Hydra does not compose a job, or that take the next argument as their value.
_NO_JOB = {"-h", "--help", "--hydra-help", "--info", "-i", "--shell-completion", "-sc"}
_WITH_VALUE = {"-c", "--cfg", "-p", "--package", "-cp", "--config-path", "-cn", "--config-name", "-cd",
               "--config-dir", "--experimental-rerun", "-i", "--info"}  # fmt: skip


def overrides_of(argv: Sequence[str]) -> list[str] | None:
    """The ``key=value`` overrides of a Hydra command line, or ``None`` where no job is composed (``--help``)."""
    overrides, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _NO_JOB or arg.startswith("--shell-completion"):
            return None
        elif arg in _WITH_VALUE:
            skip = True
        elif not arg.startswith("-"):
            overrides.append(arg)
    return overrides


def _flat_keys(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, DictConfig):
        for key in node:
            path = f"{prefix}{key!s}"
            yield path
            yield from _flat_keys(node._get_node(key), path + ".")


def closest(name: str, candidates: Sequence[str]) -> list[str]:
    """Up to three valid names most like ``name`` (a typo's likely meaning)."""
    return difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.8)


def _did_you_mean(name: str, candidates: Sequence[str]) -> str:
    near = closest(name, candidates)
    return f" Did you mean {' or '.join(near)}?" if near else ""


def _trainer_argument(key: str) -> bool:
    """Whether ``trainer.<name>`` is an argument of ``lightning.Trainer`` (only asked on the error path)."""
    if not key.startswith("trainer.") or key.count(".") != 1:
        return False
    import inspect

    import lightning

    return key.split(".", 1)[1] in inspect.signature(lightning.Trainer.__init__).parameters


def _unknown_key(tool: str, arg: str, key: str, valid: Sequence[str]) -> ConfigError:
    if _trainer_argument(key):
        return ConfigError(
            f"{arg}: {key} is a lightning.Trainer argument that the trainer config does not set, so Hydra needs it "
            f"added: +{arg}."
        )
    return ConfigError(
        f"{arg}: {tool} has no setting {key}.{_did_you_mean(key, valid)} `python -m {tool} --cfg job` prints "
        f"every setting with its value. (Hydra's +{key}=... would add the key anyway and hand it to a component "
        f"that does not take it.)"
    )


def _unknown_option(tool: str, err: MissingConfigException) -> ConfigError:
    text = str(err)
    found = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
    options = re.findall(r"^\t(\S+)$", text.split("Config search path")[0], re.M)
    if not found:
        return ConfigError(f"{tool}: {text.splitlines()[0]}")
    group, option = found.groups()
    listed = f" The options are {', '.join(options)}." if options else ""
    return ConfigError(
        f"{group}={option}: {tool} has no {group} option {option!r}.{_did_you_mean(option, options)}{listed} Each "
        f"option is a file conf/{group}/<option>.yaml."
    )


def _first_choices(parsed: list[Override]) -> list[str]:
    """The overrides with each sweep replaced by its first choice (other sweeps are left to the sweeper)."""
    out = []
    for o in parsed:
        if not o.is_sweep_override():
            out.append(o.input_line or "")
        elif isinstance(o.value(), ChoiceSweep):
            out.append(f"{o.get_key_element()}={next(o.sweep_string_iterator())}")
    return out


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    return compose(config_name, overrides=overrides, return_hydra_config=True)


def check_command_line(tool: str, config_module: str, config_name: str, overrides: list[str]) -> None:
    """Compose ``config_name`` with ``overrides`` as Hydra will; raise a :class:`ConfigError` where it would fail.

    Args:
        tool: the command, for the messages (``transfer.run``).
        config_module: the package holding the configs (``transfer.conf``).
        config_name: the tool's primary config.
        overrides: the command line's ``key=value`` arguments.
    """
    parser = OverridesParser.create()
    parsed = []
    for arg in overrides:
        try:
            parsed.append(parser.parse_override(arg))
        except HydraException as err:
            reason = str(err).splitlines()[0].split(":", 1)[-1].strip()[:160]
            raise ConfigError(
                f"{arg}: Hydra cannot parse this override ({reason}). A value with brackets, commas, quotes or "
                f"spaces needs Hydra's quotes inside the shell's: \"key='a value, with commas'\"."
            ) from err
    first = _first_choices(parsed)
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module, version_base="1.3"):
        _compose_or_explain(tool, config_name, first)
        for o in parsed:  # each option of a swept group on its own
            if o.is_sweep_override() and isinstance(o.value(), ChoiceSweep):
                key = o.get_key_element()
                for choice in list(o.sweep_string_iterator())[1:]:
                    _compose_or_explain(tool, config_name, [a for a in first if a.split("=")[0] != key]
                                        + [f"{key}={choice}"])  # fmt: skip
    GlobalHydra.instance().clear()


def _compose_or_explain(tool: str, config_name: str, overrides: list[str]) -> None:
    try:
        _compose(config_name, overrides)
    except MissingConfigException as err:
        raise _unknown_option(tool, err) from err
    except ConfigCompositionException as err:
        found = re.search(r"Could not override '([^']+)'", str(err))
        if not found:
            raise ConfigError(f"{tool}: {str(err).splitlines()[0]}") from err
        key = found.group(1)
        arg = next((a for a in overrides if a.split("=")[0].lstrip("~+") == key), key)
        rest = [a for a in overrides if a != arg]
        try:
            valid = list(_flat_keys(_compose(config_name, rest)))
        except HydraException:
            valid = []
        raise _unknown_key(tool, arg, key, valid) from err


def checked_command_line(
    tool: str, config_path: str, config_name: str, path_keys: Sequence[str] = ()
) -> Callable[[F], F]:
    """Decorate a ``@hydra.main`` function (put it above): check ``sys.argv`` before Hydra reads it.

    Path settings named in ``path_keys`` are first quoted where Hydra's grammar would misread them
    (:func:`~transfer.core.overrides.quote_path_overrides`). With ``HYDRA_FULL_ERROR=1`` the check is skipped,
    so Hydra's own error and traceback show.

    Args:
        tool: the command as users type it (``transfer.run``), for the messages.
        config_path: the ``config_path`` the tool gives ``hydra.main`` (``pkg://transfer.conf``).
        config_name: the tool's primary config (``config``, ``tools/predict``).
        path_keys: settings that hold file paths or shell patterns.

    Returns:
        The decorator.
    """

    def decorate(main: F) -> F:
        @wraps(main)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            sys.argv[1:] = quote_path_overrides(sys.argv[1:], path_keys)
            overrides = overrides_of(sys.argv[1:])
            if overrides is not None and not full_errors_requested():
                try:
                    check_command_line(tool, config_path.removeprefix("pkg://"), config_name, overrides)
                except ConfigError as err:
                    print_error(err)
                    sys.exit(2)
            return main(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def config_groups(conf_dir: str | Path, hidden: Sequence[str] = ("hydra", "tools")) -> str:
    """The run's config groups and their options, one ``group: a, b, c`` line each, for ``--help``.

    Hydra's own list shows every folder of ``conf/``, including the tools' configs and the shared base of the
    model files, which are not options a run takes; this one leaves out ``hidden`` folders and ``_``-prefixed
    ones (``model/_base``).
    """
    lines = []
    for folder in sorted(Path(conf_dir).iterdir()):
        if not folder.is_dir() or folder.name in hidden or folder.name.startswith(("_", ".")):
            continue
        options = sorted(f.stem for f in folder.glob("*.yaml"))
        if options:
            lines.append(f"{folder.name}: {', '.join(options)}")
    return "\n".join(lines)
