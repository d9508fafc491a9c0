"""What a test family declares: its options, and how it turns a store and options into a run.

A :class:`Family` is one kind of work the engine runs over the gene batches
of a store (HSIC SV tests, GLMM LLR SV tests, kernel DU tests, GLMM DU tests,
GLMM fits, feature summaries).  It declares

- the ``command`` it belongs to (``sv``, ``du``, ``glmm``, ``summary``) and the
  ``methods`` that select it within that command;
- its :class:`Option` s (name, default, choices, help; the CLI is generated
  from them, so API and CLI match name for name);
- ``prepare``: validated options -> :class:`Prepared`, i.e. the per-batch
  task, the memory per gene, the fingerprint parameters and the assembly of
  the per-batch results into the Dataset.

The engine (:func:`spatialscale.families.run_family`) is generic over it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from spatialscale.errors import InputError

__all__ = ["Option", "Family", "Prepared", "check_setting_types", "resolve_options", "MIN_BATCHES", "MIN_BATCHES_GLMM"]

#: Genes are split into at least this many batches (when there are enough) so
#: that every worker gets work.  A constant, not the cluster size, so that a
#: resumed run on a different cluster finds the same batches.
MIN_BATCHES = 16
#: GLMM fits gain most from large batches (one vectorised optimiser run per worker)
MIN_BATCHES_GLMM = 2


@dataclass(frozen=True)
class Option:
    """One option of a test family.

    Parameters
    ----------
    name
        Keyword of the Python API; the CLI flag is ``--`` + name with ``-``
        for ``_`` (``key=value`` pairs for ``kind="dict"``).
    default
        Value when the option is not given (``None``: decided by the family).
    help
        One line for ``--help`` and the docs.
    choices
        Allowed values (checked for the API too).
    kind
        ``str``, ``int``, ``bool`` (a CLI switch) or ``dict`` (``--glmm key=value``).
    methods
        Methods of the family the option applies to (empty: all of them);
        giving it with another method is an error.
    low
        Smallest allowed value of an ``int`` option.
    """

    name: str
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    kind: str = "str"
    methods: tuple[str, ...] = ()
    low: int | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass
class Prepared:
    """A family's run, ready for the engine."""

    kind: str
    params: dict[str, Any]
    task: Callable
    bytes_per_gene: Callable[[int], float]
    label: str
    assemble: Callable[[Any], Any]
    shared: Any = None
    fingerprint_extra: Any = None
    min_batches: int = MIN_BATCHES


@dataclass(frozen=True)
class Family:
    """A kind of per-gene work: options, per-batch task, result variables and assembly."""

    name: str
    command: str
    methods: tuple[str, ...]
    options: tuple[Option, ...]
    prepare: Callable[..., Prepared]
    variables: tuple[str, ...]
    description: str
    covariates: str = "none"  # "none", "optional" or "required"
    summaries: bool = field(default=True)  # whether with_summary applies
    kernels: tuple[str, ...] = ("car",)  # store kernels it runs on ("car", "fft")

    def prepare_for(self, store: Any, method: str | None, opts: dict[str, Any], covariates: Any,
                    device: str) -> Prepared:
        """:attr:`prepare` after checking that the family runs on the store's kernel."""
        if store.kernel_kind not in self.kernels:
            what = f"{self.command} {method}" if method else self.command
            raise InputError(f"{what} does not run on {store.kernel_kind} (raster) kernels yet ({store.path}); "
                             f"it needs a store ingested with kernel={' or '.join(self.kernels)}.")
        return self.prepare(store, method, opts, covariates, device)

    def option(self, name: str) -> Option:
        return next(o for o in self.options if o.name == name)


def check_setting_types(what: str, given: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Each setting of a ``key=value`` option has the type of its default (bool, whole number, number, text...).

    Settings whose default is ``None`` are left to the code that takes them.
    """
    import math

    for key, value in given.items():
        default = defaults.get(key)
        if default is None:
            continue
        if isinstance(default, bool):
            ok, want = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok, want = isinstance(value, int) and not isinstance(value, bool), "a whole number"
        elif isinstance(default, float):
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            want = "a finite number"
        elif isinstance(default, str):
            ok, want = isinstance(value, str), "text"
        elif isinstance(default, tuple | list):
            ok, want = isinstance(value, tuple | list) and len(value) == len(default), f"{len(default)} values"
        elif isinstance(default, dict):
            ok, want = isinstance(value, dict), "a mapping"
        else:
            continue
        if not ok:
            raise InputError(f"{what} setting {key}={value!r} must be {want}.")


def resolve_options(family: Family, method: str | None, given: dict[str, Any],
                    elsewhere: dict[str, tuple[str, ...]] | None = None) -> dict[str, Any]:
    """The family's option values: given ones checked, the rest defaulted.

    ``given`` holds the options the user set (``None`` means not set).
    An option the family (or the chosen method) does not take is an error
    (restating its default is allowed); ``elsewhere`` (option -> methods of
    the command that take it) lets the message name where it applies.
    """
    known = {o.name: o for o in family.options}
    out: dict[str, Any] = {}
    for name, value in given.items():
        if value is None:
            continue
        opt = known.get(name)
        if opt is not None and opt.methods and method not in opt.methods and value == opt.default:
            continue  # restating the default of an option that does not apply changes nothing
        if opt is None or (opt.methods and method not in opt.methods):
            where = f"method {method!r}" if method else f"{family.command}"
            takers = (elsewhere or {}).get(name, ())
            hint = f" (it applies to {', '.join(takers)})" if takers else ""
            raise InputError(f"option {name!r} does not apply to {where}{hint}.")
        if opt.kind == "dict" and not isinstance(value, dict):
            raise InputError(f"option {name!r} must be a dict of settings (got {type(value).__name__}).")
        if opt.kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            raise InputError(f"option {name!r} must be a whole number (got {value!r}).")
        if opt.low is not None and value < opt.low:
            raise InputError(f"{name} must be >= {opt.low} (got {value!r}; {opt.flag}).")
        if opt.choices is not None and value not in opt.choices:
            raise InputError(f"unknown {name} {value!r}; choose one of {', '.join(map(str, opt.choices))}.")
        out[name] = value
    for opt in family.options:
        if opt.name not in out and (not opt.methods or method in opt.methods):
            out[opt.name] = opt.default
    return out
