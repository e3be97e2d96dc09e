"""The base Method's construction hooks as each method of the registry uses them: one LoRA that every task
trains (``one_adapter``) or one per task, and the refusal of a single task by the methods that work between
tasks (``needs_tasks``)."""

from __future__ import annotations

import pytest

from speclora.methods import FAMO, METHODS, Method, get_method
from speclora.methods.famo import ADAPTERS
from speclora.tasks import get_task

# one LoRA per layer, trained by every task (FAMO: with adapters='shared'); full_ft holds no adapters
ONE_ADAPTER = {"shared", "ortho", "unolora_star", "adalora", "cagrad", "nash_mtl"}
# work between tasks, so one task is refused
SEVERAL_TASKS = {"ortho", "famo", "cagrad", "nash_mtl", "mtl_lora", "mtlora"}
ONE, TWO = [get_task("rte")], [get_task("rte"), get_task("stsb")]


@pytest.mark.parametrize("name", sorted(set(METHODS) - {"full_ft"}))
def test_adapters_per_layer_and_which_one_a_task_exports(name):
    method = get_method(name)
    if name in ONE_ADAPTER:
        assert method.num_adapters(4) == 1 and [method.adapter_of_task(t) for t in range(4)] == [0, 0, 0, 0]
    else:
        assert method.num_adapters(4) == 4 and [method.adapter_of_task(t) for t in range(4)] == [0, 1, 2, 3]
    # the hooks' class settings are no constructor arguments: the config a checkpoint keeps rebuilds the method
    args = method.hparams()["init_args"]
    assert not {"one_adapter", "needs_tasks"} & set(args)
    assert get_method(method.hparams()).hparams() == method.hparams()


@pytest.mark.parametrize("adapters", ADAPTERS)
def test_famo_shares_one_adapter_only_when_told(adapters):
    method = FAMO(adapters=adapters)
    assert method.num_adapters(3) == (1 if adapters == "shared" else 3)
    assert "one_adapter" not in method.hparams()["init_args"]
    assert get_method(method.hparams()).num_adapters(3) == method.num_adapters(3)


@pytest.mark.parametrize("name", sorted(set(METHODS) - {"single"}))
def test_one_task_is_refused_by_exactly_the_methods_that_work_between_tasks(name):
    method = get_method(name)
    method.check(TWO)
    if name in SEVERAL_TASKS:
        with pytest.raises(ValueError, match=rf"model.method={type(method).__name__} .+ but data.tasks has 1: "
                                             r"\['rte'\]; give two or more tasks, or use method Single"):
            method.check(ONE)
    else:
        method.check(ONE)


def test_the_base_hooks_read_the_class_settings():
    class Pairwise(Method):
        base = True  # kept out of model.method's choices (method_classes), which other tests list
        needs_tasks = "compares tasks"
        one_adapter = True

    method = Pairwise()
    assert method.num_adapters(5) == 1 and method.adapter_of_task(3) == 0
    with pytest.raises(ValueError, match=r"model.method=Pairwise compares tasks but data.tasks has 1"):
        method.check(ONE)
    assert Method().num_adapters(5) == 5 and Method().adapter_of_task(3) == 3
    Method().check(ONE)
