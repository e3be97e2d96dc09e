"""``model.compile``: the adapted encoder's forward compiled by ``torch.compile``, with a logged, counted
fallback to eager.

What is compiled is the static part of a step: the encoder run on a routed batch (the frozen encoder, the
method's adapter layers, the per-row gathers; speclora.model.adapted). The routing and the method's
``before_encode`` stay eager (they read host values: the collator's task ids, a method's schedule), as do the
heads and loss. The module's parameters are the ones compiled, so state-dict keys are unchanged (no
``_orig_mod.`` prefix: a function is compiled, not the module replaced) and checkpoints are the same files.

Shapes: ``dynamic`` is torch's switch. The default (null) compiles a first graph for the first batch's
shapes and, at the first change of a shape (rows, padded length: ``data.group_by_length`` varies them), one
graph with symbolic shapes that serves every later batch; ``true`` starts symbolic, ``false`` specialises on
every shape (each new length compiles anew, up to dynamo's recompile limit).

Failures: torch.compile compiles at the first call of each new guard set (first batch, the first
evaluation under no_grad, ...). Where dynamo or its backend fails then (``TorchDynamoException``: an
unsupported construct, a backend compiler error; or dynamo's recompile limit hit, ``recompile_limit``
graphs for one function, which dynamo itself would answer by running eagerly with a log line only),
:class:`CompiledFunction` logs a warning naming the error, counts it (``compile_fallbacks``, logged as
``train/compile_fallbacks``), and runs that call and every later one eagerly. A method that cannot be
compiled says so (``Method.compile_unsupported``) and is run eagerly from the start, with the same warning
and count. Errors of the model itself (a wrong router index, a shape mismatch) are not compile failures:
eager raises them the same way, so they propagate.

Process-wide effects: the first compile turns AOTAutograd's buffer donation off (:func:`_keep_buffers`:
Ortho's per-task backward passes need the graph kept); each compiled function has its own copy of the code
(:func:`_private_copy`), so its graphs and recompile budget are its own.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

__all__ = ["COMPILE_MODES", "CompileConfig", "CompiledFunction", "compile_config"]

COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
_KEY = "model.compile"


@dataclass(frozen=True)
class CompileConfig:
    """How the adapted encoder's forward is compiled (``--model.compile.*``).

    Args:
        mode: ``off`` (eager, the default), or torch.compile's mode: ``default``, ``reduce-overhead`` (CUDA
            graphs on a GPU: the step's kernel launches replayed; nothing more than ``default`` on a CPU),
            ``max-autotune`` (autotuned kernels, long first compile).
        backend: torch.compile's backend: ``inductor`` (generated kernels), or ``aot_eager`` / ``eager``
            (traced, run by torch's own kernels: for tests and to tell a backend failure from a tracing one).
        dynamic: symbolic shapes: null = torch's automatic (static first, dynamic at the first change of a
            shape), true = symbolic from the start, false = a graph per shape.
        fullgraph: refuse graph breaks (a break is then a compile failure, so a fallback to eager).
    """

    mode: Literal["off", "default", "reduce-overhead", "max-autotune"] = "off"
    backend: str = "inductor"
    dynamic: bool | None = None
    fullgraph: bool = False

    def __post_init__(self) -> None:
        if self.mode not in COMPILE_MODES:
            raise ValueError(f"{_KEY}.mode={self.mode!r}; allowed: {', '.join(map(repr, COMPILE_MODES))}")
        if self.enabled and (not isinstance(self.backend, str) or self.backend not in _backends()):
            # checked only when on: listing the backends imports torch._dynamo (seconds)
            raise ValueError(f"{_KEY}.backend={self.backend!r} is not a torch.compile backend; allowed: "
                             f"{', '.join(map(repr, _backends()))}")
        if self.dynamic not in (None, True, False):
            raise ValueError(f"{_KEY}.dynamic={self.dynamic!r}; allowed: null, true, false")
        if self.fullgraph not in (True, False):
            raise ValueError(f"{_KEY}.fullgraph={self.fullgraph!r}; allowed: true, false")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def options(self) -> dict[str, Any]:
        """torch.compile's keyword arguments (``mode`` only where the backend takes one: inductor)."""
        kwargs: dict[str, Any] = {"backend": self.backend, "dynamic": self.dynamic, "fullgraph": self.fullgraph}
        if self.backend == "inductor" and self.mode != "default":
            kwargs["mode"] = self.mode
        return kwargs


def _backends() -> list[str]:
    return sorted(torch._dynamo.list_backends(exclude_tags=()))


def compile_config(value: Any) -> CompileConfig:
    """``model.compile`` from what the module's argument holds: a :class:`CompileConfig`; its fields as a
    dict (a checkpoint's hyperparameters); a mode name (``"default"``, ...); a bool (true = ``default``);
    None (off)."""
    if isinstance(value, CompileConfig):
        return value
    if value is None or value is False:
        return CompileConfig()
    if value is True:
        return CompileConfig(mode="default")
    if isinstance(value, str):
        return CompileConfig(mode=value)  # type: ignore[arg-type] - checked in __post_init__
    if isinstance(value, Mapping):
        fields = dict(value)
        unknown = set(fields) - set(CompileConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{_KEY}={fields!r}: unknown field(s) {', '.join(sorted(unknown))}; allowed fields: "
                             f"{', '.join(CompileConfig.__dataclass_fields__)}")
        return CompileConfig(**fields)
    raise ValueError(f"{_KEY}={value!r}; allowed: a mode ({', '.join(map(repr, COMPILE_MODES))}), true / false, "
                     f"or {{mode, backend, dynamic, fullgraph}}")


class CompiledFunction:
    """``fn`` compiled by torch.compile (``config``), falling back to ``fn`` itself where compiling fails.

    Calls go to the compiled function until a call raises a dynamo / backend error
    (``torch._dynamo.exc.TorchDynamoException``, or ``FailOnRecompileLimitHit``: :func:`_compile_settings`);
    that call is then run eagerly, a warning names ``what`` and the error, :attr:`fallbacks` counts it, and
    every later call runs eagerly. ``refuse``: a reason not to compile at all (an incompatible method): eager
    from the start, warned and counted the same way.

    The compiled function is built at the first call and not pickled or deep-copied (a copy compiles anew
    for its own ``fn``).
    """

    def __init__(self, fn: Callable[..., Any], config: CompileConfig, what: str, refuse: str | None = None) -> None:
        if not config.enabled:
            raise ValueError(f"CompiledFunction: {_KEY}.mode is 'off'; call {what} directly")
        self.fn = fn
        self.config = config
        self.what = what
        self.fallbacks = 0
        self.reason: str | None = None  # why it runs eagerly (None: compiled)
        self._compiled: Callable[..., Any] | None = None
        if refuse is not None:
            self._fall_back(refuse)

    @property
    def active(self) -> bool:
        """Whether calls still go to the compiled function."""
        return self.reason is None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.reason is not None:
            return self.fn(*args, **kwargs)
        if self._compiled is None:
            _keep_buffers()
            self._compiled = torch.compile(_private_copy(self.fn), **self.config.options())
        if self.config.mode == "reduce-overhead":
            # CUDA graphs: a new step begins at each forward (the previous step's outputs are spent by then:
            # its backward has run), so a replay never waits on, or overwrites, tensors still in use
            torch.compiler.cudagraph_mark_step_begin()
        with _compile_settings():
            try:
                return self._compiled(*args, **kwargs)
            except (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit) as err:
                self._fall_back(f"{type(err).__name__}: {_first_line(err)}")
        return self.fn(*args, **kwargs)

    def _fall_back(self, reason: str) -> None:
        self.reason = reason
        self.fallbacks += 1
        self._compiled = None
        log.warning("%s=%s: %s runs eagerly (compile fallback #%d): %s", _KEY, self.config.mode, self.what,
                    self.fallbacks, reason)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_compiled"] = None  # compiled code holds the original fn: a copy compiles its own
        return state

    def __repr__(self) -> str:
        state = "compiled" if self.active else f"eager ({self.reason})"
        return f"CompiledFunction({self.what}, {self.config}, {state}, fallbacks={self.fallbacks})"


def _private_copy(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (a function or bound method) with its own copy of the code object.

    Dynamo keeps compiled graphs, and counts recompiles against its limit, per code object: every module's
    ``run_encoder`` shares one, so modules of different methods in one process (benchmarks, tests, several
    runs in one process) would use up each other's recompile budget, and dead modules' graphs would stay
    cached. A private code object gives each compiled function its own cache, freed with it."""
    func, owner = (fn.__func__, fn.__self__) if inspect.ismethod(fn) else (fn, None)
    if not inspect.isfunction(func):
        return fn
    private = types.FunctionType(func.__code__.replace(), func.__globals__, func.__name__, func.__defaults__,
                                 func.__closure__)
    private.__kwdefaults__ = func.__kwdefaults__
    private.__qualname__ = func.__qualname__
    return types.MethodType(private, owner) if owner is not None else private


@contextlib.contextmanager
def _compile_settings() -> Iterator[None]:
    """dynamo's ``fail_on_recompile_limit_hit`` for the duration of a compiled call (read when it compiles):
    past the recompile limit dynamo raises, and the caller falls back, counted, instead of dynamo running the
    function eagerly with a log line only."""
    config = torch._dynamo.config
    saved = config.fail_on_recompile_limit_hit
    config.fail_on_recompile_limit_hit = True
    try:
        yield
    finally:
        config.fail_on_recompile_limit_hit = saved


def _keep_buffers() -> None:
    """AOTAutograd's buffer donation off, for the process (``torch._functorch.config.donated_buffer``).

    A compiled backward that donates its saved buffers refuses a second backward through the same forward
    (``retain_graph=True``), which Ortho and ``task_grads: backward`` take once per task; torch reads the
    setting both when it compiles and when the backward runs, so it cannot be set for a call only. Donation
    only lowers the backward's peak memory; it is off for every method alike, from the first compile on."""
    config = torch._functorch.config
    if config.donated_buffer:
        config.donated_buffer = False
        log.info("%s: torch._functorch.config.donated_buffer set to False for this process (methods that take "
                 "several backward passes through one forward need the compiled graph's buffers kept)", _KEY)


def _first_line(err: BaseException) -> str:
    """The first line of ``err``'s message, then its cause's (a backend failure says "backend='x' raised:")."""
    text = str(err).strip()
    line = text.splitlines()[0][:300] if text else "(no message)"
    cause = getattr(err, "inner_exception", None) or err.__cause__
    if cause is not None and cause is not err:
        line += f" {type(cause).__name__}: {_first_line(cause)}"
    return line
