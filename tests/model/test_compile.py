"""``model.compile``: the compiled step equals the eager one, checkpoints keep their keys, a failure to compile
falls back to eager with a warning and a count, and wrong values are refused naming the key.

Tolerances: ``aot_eager`` traces the step and runs torch's own kernels, so losses and gradients agree to
rtol 1e-5 / atol 1e-6 (bitwise in practice); ``inductor`` generates fused kernels that reassociate float32
sums: rtol 1e-4 / atol 1e-5 on losses and gradients. Compiling takes seconds to minutes on a loaded 2-core
CPU, so every test that compiles is ``slow``; the config checks and the refused method run in the default set.
"""

from __future__ import annotations

import copy
import logging
from typing import ClassVar

import pytest
import torch
from torch import nn

from speclora.methods import Independent
from speclora.methods.base import Method
from speclora.model.compile import CompileConfig, CompiledFunction, compile_config
from speclora.model.lora import lora_modules
from speclora.model.module import SpecLoRAModule
from tests.model.batches import train_batches

TASKS = ["rte", "cola", "stsb", "copa"]  # pairs and single sentences (lengths vary), regression, choice
TOLERANCE = {"aot_eager": {"rtol": 1e-5, "atol": 1e-6}, "inductor": {"rtol": 1e-4, "atol": 1e-5}}
FAILING = "speclora_test_failing_backend"


def _failing_backend(gm, example_inputs):
    raise RuntimeError("this backend fails on purpose")


@pytest.fixture(scope="module")
def failing_backend() -> str:
    from torch._dynamo import list_backends, register_backend

    if FAILING not in list_backends(exclude_tags=()):
        register_backend(_failing_backend, name=FAILING)
    return FAILING


@pytest.fixture(scope="module")
def batches(tiny_backbone, data_root, tmp_path_factory):
    """Three mixed batches whose row counts and padded lengths differ (dynamic shapes)."""
    out = train_batches(tiny_backbone, data_root, tmp_path_factory.getbasetemp() / "token_cache", TASKS, 3,
                        max_length=64, batch_size=10)
    assert len({tuple(b["input_ids"].shape) for b in out}) > 1  # the shapes do vary
    return out


def _module(tiny_backbone, method: str | Method, compile=None) -> SpecLoRAModule:
    """A module without dropout (compiled dropout draws other random numbers), non-zero B."""
    torch.manual_seed(0)
    module = SpecLoRAModule(TASKS, backbone=tiny_backbone, method=method, lora={"dropout": 0.0},
                            head_dropout=0.0, compile=compile)
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    g = torch.Generator().manual_seed(1)
    for _, layer in lora_modules(module.encoder):
        layer.lora_B.data = torch.randn(layer.lora_B.shape, generator=g) * 0.1
    return module


def _steps(module: SpecLoRAModule, batches) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Per batch: the training step's loss and the gradients after the method's after_backward (no update, so
    every batch sees the same parameters)."""
    out = []
    for batch in batches:
        module.zero_grad(set_to_none=True)
        loss = module.training_step(batch, 0)
        loss.backward()
        module.on_after_backward()  # cagrad: the per-row capture replaced by the combined gradient here
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        out.append((loss.detach(), grads))
    return out


def _assert_same_steps(eager, compiled, backend: str) -> None:
    for (loss_e, grads_e), (loss_c, grads_c) in zip(eager, compiled, strict=True):
        torch.testing.assert_close(loss_c, loss_e, **TOLERANCE[backend])
        assert set(grads_c) == set(grads_e)
        assert any(n.startswith("adapted.") for n in grads_e)  # the compiled part's parameters have gradients
        for name in grads_e:
            torch.testing.assert_close(grads_c[name], grads_e[name], **TOLERANCE[backend], msg=name)


# ---------------------------------------------------------------------- the setting
@pytest.mark.parametrize(("value", "mode"), [(None, "off"), (False, "off"), (True, "default"),
                                             ("reduce-overhead", "reduce-overhead"),
                                             ({"mode": "max-autotune", "dynamic": True}, "max-autotune")])
def test_model_compile_takes_a_mode_a_bool_or_its_fields(value, mode):
    assert compile_config(value).mode == mode
    assert compile_config(CompileConfig()) == CompileConfig()


@pytest.mark.parametrize(("value", "match"), [
    ("fast", r"model.compile.mode='fast'; allowed: 'off', 'default', 'reduce-overhead', 'max-autotune'"),
    (3, r"model.compile=3; allowed: a mode \('off', 'default', 'reduce-overhead', 'max-autotune'\), true / false"),
    ({"mode": "default", "speed": 2}, r"model.compile=.*unknown field\(s\) speed; allowed fields: mode, backend"),
    ({"mode": "default", "backend": "nope"}, r"model.compile.backend='nope' is not a torch.compile backend; "
                                             r"allowed: .*'inductor'"),
    ({"mode": "default", "dynamic": "yes"}, r"model.compile.dynamic='yes'; allowed: null, true, false"),
])
def test_a_wrong_model_compile_is_refused_naming_the_key_and_what_is_allowed(value, match):
    with pytest.raises(ValueError, match=match):
        compile_config(value)


def test_the_module_refuses_a_wrong_model_compile_before_loading_anything():
    with pytest.raises(ValueError, match=r"model.compile.mode='fast'; allowed: 'off', 'default'"):
        SpecLoRAModule(TASKS, backbone="/nonexistent/backbone", compile="fast")


def test_off_by_default_and_recorded_in_the_hyperparameters(tiny_backbone):
    module = SpecLoRAModule(["rte"], backbone=tiny_backbone, method="single")
    assert module.adapted.encoder_call is None and module.adapted.compile_fallbacks == 0
    assert module.hparams["compile"]["mode"] == "off"


class _NotCompilable(Independent):
    compile_unsupported: ClassVar[str | None] = "its hooks read host values (test)"


def test_a_method_that_cannot_be_compiled_runs_eagerly_warned_and_counted(tiny_backbone, batches, caplog):
    with caplog.at_level(logging.WARNING, logger="speclora.model.compile"):
        module = _module(tiny_backbone, _NotCompilable(), compile="default")
    call = module.adapted.encoder_call
    assert not call.active and module.adapted.compile_fallbacks == 1
    assert "method _NotCompilable: its hooks read host values (test)" in caplog.text
    assert "model.compile=default: the adapted encoder of method _NotCompilable runs eagerly" in caplog.text
    eager = _module(tiny_backbone, _NotCompilable())
    _assert_same_steps(_steps(eager, batches[:1]), _steps(module, batches[:1]), "aot_eager")
    assert call._compiled is None  # never compiled


# ---------------------------------------------------------------------- the fallback
def test_a_failing_compile_falls_back_to_eager_warns_and_counts(failing_backend, caplog):
    calls = []

    def fn(x):
        calls.append(1)
        return torch.tanh(x) * 2

    wrapped = CompiledFunction(fn, CompileConfig(mode="default", backend=failing_backend), "fn")
    x = torch.randn(3, 4)
    with caplog.at_level(logging.WARNING, logger="speclora.model.compile"):
        torch.testing.assert_close(wrapped(x), torch.tanh(x) * 2)
    assert wrapped.fallbacks == 1 and not wrapped.active
    assert wrapped.reason.startswith("BackendCompilerFailed: backend='speclora_test_failing_backend' raised:")
    assert "RuntimeError: this backend fails on purpose" in caplog.text
    assert "model.compile=default: fn runs eagerly (compile fallback #1)" in caplog.text
    wrapped(x)
    assert wrapped.fallbacks == 1  # counted once; later calls go straight to eager


def test_the_recompile_limit_is_a_counted_fallback_not_a_quiet_one(caplog):
    import torch._dynamo

    wrapped = CompiledFunction(lambda x: x * 2, CompileConfig(mode="default", backend="eager", dynamic=False), "fn")
    with torch._dynamo.config.patch(recompile_limit=2), \
            caplog.at_level(logging.WARNING, logger="speclora.model.compile"):
        for n in range(1, 5):  # dynamic=False: a graph per shape, the third is over the limit
            torch.testing.assert_close(wrapped(torch.ones(n)), torch.full((n,), 2.0))
    assert wrapped.fallbacks == 1 and wrapped.reason.startswith("FailOnRecompileLimitHit")
    assert "compile fallback #1" in caplog.text
    assert torch._dynamo.config.fail_on_recompile_limit_hit is False  # set for the call only


def test_each_compiled_function_keeps_its_own_graphs_and_recompile_budget():
    # dynamo caches per code object: without a private copy, the second function's graph would be the first's
    # recompile, over a limit of 1
    import torch._dynamo

    def double(x):
        return x * 2

    first, second = (CompiledFunction(double, CompileConfig(mode="default", backend="eager", dynamic=False), name)
                     for name in ("first", "second"))
    with torch._dynamo.config.patch(recompile_limit=1):
        first(torch.ones(2))
        second(torch.ones(3))
    assert first.active and second.active and first.fallbacks == second.fallbacks == 0


def test_an_error_of_the_model_itself_is_not_taken_for_a_compile_failure():
    def fn(x):
        if x.shape[0] == 3:
            raise ValueError("wrong rows")
        return x

    wrapped = CompiledFunction(fn, CompileConfig(mode="default", backend="eager"), "fn")
    with pytest.raises(ValueError, match="wrong rows"):
        wrapped(torch.zeros(3))
    assert wrapped.fallbacks == 0 and wrapped.active


@pytest.mark.slow
def test_the_module_falls_back_at_its_first_compiled_step(tiny_backbone, batches, failing_backend, caplog):
    eager = _module(tiny_backbone, "independent")
    module = _module(tiny_backbone, "independent", compile={"mode": "default", "backend": failing_backend})
    assert module.adapted.compile_fallbacks == 0
    with caplog.at_level(logging.WARNING, logger="speclora.model.compile"):
        _assert_same_steps(_steps(eager, batches[:2]), _steps(module, batches[:2]), "aot_eager")
    assert module.adapted.compile_fallbacks == 1
    assert "the adapted encoder of method Independent runs eagerly" in caplog.text


# ---------------------------------------------------------------------- the compiled step
@pytest.mark.slow
@pytest.mark.parametrize("method", ["independent", "speclora", "cagrad"])
def test_the_compiled_step_gives_the_eager_loss_and_gradients(tiny_backbone, batches, method):
    eager = _module(tiny_backbone, method)
    module = _module(tiny_backbone, method, compile={"mode": "default", "backend": "aot_eager"})
    compiled = _steps(module, batches)
    assert module.adapted.encoder_call.active and module.adapted.compile_fallbacks == 0
    if method == "cagrad":  # the per-row capture's forward and tensor hooks ran in the compiled encoder
        assert module.adapted.work.last and len(module.adapted.work.last["beta"]) >= 2
    _assert_same_steps(_steps(eager, batches), compiled, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["shared", "ortho", "nash_mtl", "famo", "full_ft", "mtlora", "mtl_lora",
                                    "unolora_star", "hyperformer", "adalora"])
def test_every_method_compiles_to_the_eager_loss_and_gradients(tiny_backbone, batches, method):
    # ortho (and task_grads: backward) take a backward per task through one forward: retain_graph=True
    eager = _module(tiny_backbone, method) if method != "full_ft" else _full_ft(tiny_backbone)
    module = (_module(tiny_backbone, method, compile={"mode": "default", "backend": "aot_eager"}) if method != "full_ft"
              else _full_ft(tiny_backbone, compile={"mode": "default", "backend": "aot_eager"}))
    compiled = _steps(module, batches)
    assert module.adapted.encoder_call.active and module.adapted.compile_fallbacks == 0
    _assert_same_steps(_steps(eager, batches), compiled, "aot_eager")


def _full_ft(tiny_backbone, compile=None) -> SpecLoRAModule:
    torch.manual_seed(0)
    module = SpecLoRAModule(TASKS, backbone=tiny_backbone, method="full_ft", head_dropout=0.0, compile=compile)
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return module


@pytest.mark.slow
def test_the_default_backend_gives_the_eager_loss_and_gradients(tiny_backbone, batches):
    eager = _module(tiny_backbone, "independent")
    module = _module(tiny_backbone, "independent", compile="default")  # inductor, dynamic shapes by torch
    compiled = _steps(module, batches)
    assert module.adapted.encoder_call.active and module.adapted.compile_fallbacks == 0
    _assert_same_steps(_steps(eager, batches), compiled, "inductor")


@pytest.mark.slow
def test_compile_leaves_the_state_dict_keys_and_copies_alone(tiny_backbone, batches):
    eager = _module(tiny_backbone, "independent")
    module = _module(tiny_backbone, "independent", compile={"mode": "default", "backend": "aot_eager"})
    _steps(module, batches[:1])
    assert module.adapted.encoder_call._compiled is not None  # compiled and run
    keys = list(module.state_dict())
    assert keys == list(eager.state_dict()) and not any("_orig_mod" in k for k in keys)
    module.load_state_dict(eager.state_dict())  # strict: an eager module's checkpoint loads into a compiled one
    twin = copy.deepcopy(module)  # a copy compiles for its own encoder, not for the original's
    assert twin.adapted.encoder_call.fn.__self__ is twin.adapted and twin.adapted.encoder_call._compiled is None
    for _, layer in lora_modules(twin.encoder):
        layer.lora_B.data.zero_()  # the copy's adapters off: its output must differ from the original's
    with torch.no_grad():
        ours, theirs = module.encode(batches[0]), twin.encode(batches[0])
    assert (ours - theirs).abs().max() > 1e-4


@pytest.mark.slow
def test_a_fit_through_the_cli_with_model_compile_logs_no_fallback(tiny_backbone, data_root, tmp_path):
    from speclora.cli import main
    from tests.cli_args import fit_args

    args = fit_args(tiny_backbone, data_root, tmp_path.parent / "token_cache", tmp_path / "runs", steps=3)
    cli = main(["fit", *args, "--model.compile.mode", "default", "--model.compile.backend", "eager",
                "--trainer.log_every_n_steps", "1"])
    module = cli.model
    assert module.compile_cfg == CompileConfig(mode="default", backend="eager")
    assert module.adapted.encoder_call.active and module.adapted.encoder_call._compiled is not None
    assert float(cli.trainer.callback_metrics["train/compile_fallbacks"]) == 0.0
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    ckpt = torch.load(next((tmp_path / "runs").rglob("*.ckpt")), weights_only=False)
    assert ckpt["hyper_parameters"]["compile"]["mode"] == "default"
    assert not any("_orig_mod" in k for k in ckpt["state_dict"])


# ---------------------------------------------------------------------- on a GPU (python -m pytest -m gpu ...)
def _cuda(batches) -> list[dict]:
    return [{k: v.cuda() if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("mode", "method"), [("default", "independent"), ("reduce-overhead", "independent"),
                                              ("default", "cagrad"), ("reduce-overhead", "speclora")])
def test_the_compiled_step_on_cuda_gives_the_eager_loss_and_gradients(tiny_backbone, batches, mode, method):
    # reduce-overhead: CUDA graphs (one per shape); a step's outputs are read before the next step replays
    cuda = _cuda(batches)
    eager = _module(tiny_backbone, method).cuda()
    module = _module(tiny_backbone, method, compile=mode).cuda()
    compiled = _steps(module, cuda + cuda)  # each shape twice: recorded, then replayed
    assert module.adapted.encoder_call.active and module.adapted.compile_fallbacks == 0
    _assert_same_steps(_steps(eager, cuda + cuda), compiled, "inductor")
    assert all(g.device.type == "cuda" for _, grads in compiled for g in grads.values())
