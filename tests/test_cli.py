"""`speclora` through LightningCLI: every YAML parses, fit runs end to end, resume is exact, the console script
exits 0 on success and non-zero on failure, export writes adapters that plain peft runs, bad input is refused."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from speclora.cli import console, main
from tests.cli_args import fit_args

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def _tiny_args(tiny_backbone, data_root, root, cache, *extra):
    # the small suite, uncapped; steps and validation as ``extra`` says
    return [*fit_args(tiny_backbone, data_root, cache, root, "suites/small.yaml", steps=None, caps=None), *extra]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_config_parses(config, tiny_backbone, data_root):
    # partial configs (a method, a suite) are layered on the default job, as the README shows
    stack = [] if config.name == "default.yaml" and config.parent.name == "configs" else \
        ["--config", str(REPO / "configs" / "default.yaml")]
    from speclora.cli import SpecLoRACLI, trainer_defaults
    from speclora.data.datamodule import MultiTaskDataModule
    from speclora.model.module import SpecLoRAModule

    cli = SpecLoRACLI(
        SpecLoRAModule, MultiTaskDataModule, run=False, trainer_defaults=trainer_defaults(),
        args=[*stack, "--config", str(config), "--model.backbone", tiny_backbone, "--data.data_dir", str(data_root)],
    )
    assert cli.model.specs and [s.name for s in cli.model.specs] == cli.datamodule.tasks
    assert cli.trainer is not None


@pytest.mark.parametrize("config", ["default.yaml", "suites/default.yaml", "bench/gpu.yaml"])
def test_configs_spell_the_default_suite_of_the_registry(config):
    # the default suite is defined once (speclora.tasks.DEFAULT_SUITE); the configs that write it out match it
    import yaml

    from speclora.data.datamodule import MultiTaskDataModule
    from speclora.tasks import DEFAULT_SUITE

    assert yaml.safe_load((REPO / "configs" / config).read_text())["data"]["tasks"] == DEFAULT_SUITE
    assert inspect.signature(MultiTaskDataModule).parameters["tasks"].default == DEFAULT_SUITE


def test_fit_then_test_through_the_cli(tiny_backbone, data_root, tmp_path):
    args = _tiny_args(tiny_backbone, data_root, tmp_path / "runs", tmp_path.parent / "token_cache",
                      "--trainer.max_steps", "4", "--trainer.val_check_interval", "2")
    cli = main(["fit", *args])
    metrics = cli.trainer.callback_metrics
    for key in ("val/average", "val/rte/accuracy", "val/stsb/pearson", "val/copa/score", "train/loss"):
        assert key in metrics, f"{key} not logged; logged: {sorted(metrics)}"
    assert torch.isfinite(metrics["val/average"])
    assert cli.trainer.global_step == 4
    log_dir = Path(cli.trainer.log_dir)
    assert list(log_dir.glob("events.out.tfevents.*")), "no TensorBoard event file"
    assert (log_dir / "checkpoints" / "last.ckpt").is_file()
    assert (log_dir / "config.yaml").is_file()

    tested = main(["test", *args, "--ckpt_path", str(log_dir / "checkpoints" / "last.ckpt")])
    assert "test/average" in tested.trainer.callback_metrics


class _Record(Callback):
    """Keeps what each training step saw, and the adapters at the end."""

    def __init__(self) -> None:
        self.batches: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches[trainer.global_step] = (batch["task"] * 100_000 + batch["uid"]).tolist()


def test_resume_mid_epoch_continues_exactly(tiny_backbone, data_root, tmp_path):
    from speclora.cli import SpecLoRACLI, trainer_defaults
    from speclora.data.datamodule import MultiTaskDataModule
    from speclora.model.module import SpecLoRAModule

    def run(root, steps, ckpt=None, every=None):
        record = _Record()
        defaults = trainer_defaults()
        defaults["callbacks"] = [record]
        extra = ["--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
                 "--trainer.enable_checkpointing", "false"]
        args = _tiny_args(tiny_backbone, data_root, root, tmp_path.parent / "token_cache", *extra)
        cli = SpecLoRACLI(SpecLoRAModule, MultiTaskDataModule, run=False, trainer_defaults=defaults, args=args)
        if every:
            from lightning.pytorch.callbacks import ModelCheckpoint

            cli.trainer.callbacks.append(ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=every,
                                                         save_top_k=-1, filename="{step}"))
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
        return cli, record

    full, full_record = run(tmp_path / "a", 6, every=3)
    ckpt = tmp_path / "a" / "ckpt" / "step=3.ckpt"
    assert ckpt.is_file()
    resumed, resumed_record = run(tmp_path / "b", 6, ckpt=str(ckpt))
    assert sorted(resumed_record.batches) == [3, 4, 5]
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    assert full.model._frozen_keys and not any(k in saved for k in full.model._frozen_keys)  # a lean checkpoint
    for step in (3, 4, 5):
        assert resumed_record.batches[step] == full_record.batches[step], f"step {step} saw another batch"
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        if a.requires_grad:
            assert torch.equal(a, b), f"{name} differs after resume"


def test_checkpointing_and_logger_can_be_switched_off(tiny_backbone, data_root, tmp_path):
    # the default checkpoint and learning-rate monitor give way instead of clashing with the trainer flags
    args = _tiny_args(tiny_backbone, data_root, tmp_path / "runs", tmp_path.parent / "token_cache",
                      "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                      "--trainer.enable_checkpointing", "false", "--trainer.logger", "false")
    cli = main(["fit", *args])
    assert cli.trainer.global_step == 2
    assert cli.trainer.checkpoint_callback is None
    assert not list((tmp_path / "runs").rglob("*.ckpt"))


# ---------------------------------------------------------------------- exit status, subcommands, export
@pytest.fixture(scope="module")
def fitted(tiny_backbone, data_root, tmp_path_factory):
    """One 4-step fit of the small suite (learning rate 0.05: the adapters move well away from their init);
    returns its command-line arguments and log folder."""
    root = tmp_path_factory.mktemp("fitted")
    args = fit_args(tiny_backbone, data_root, tmp_path_factory.getbasetemp() / "token_cache", root / "runs",
                    "suites/small.yaml", steps=4)
    args += ["--model.optim.lr", "0.05", "--model.optim.head_lr", "0.05"]
    cli = main(["fit", *args])
    return args, Path(cli.trainer.log_dir)


def _subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def test_the_console_script_exits_zero_after_a_fit(tiny_backbone, data_root, tmp_path):
    # what pip's generated `speclora` script does: sys.exit(<the pyproject entry point>())
    entry = re.search(r'^speclora = "(.+):(.+)"$', (REPO / "pyproject.toml").read_text(), flags=re.M)
    module, function = entry.groups()  # [project.scripts] (tomllib is Python >= 3.11)
    script = f"import sys; from {module} import {function}; sys.exit({function}())"
    args = fit_args(tiny_backbone, data_root, tmp_path.parent / "token_cache", tmp_path / "runs", "suites/small.yaml")
    done = subprocess.run([sys.executable, "-c", script, "fit", *args, "--trainer.fast_dev_run", "true"],
                          capture_output=True, text=True, env=_subprocess_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "SpecLoRACLI object" not in done.stderr
    assert "`Trainer.fit` stopped" in done.stderr  # the run did train (one step and one validation batch)


def test_the_subcommands_return_zero(fitted, tmp_path):
    args, log_dir = fitted
    ckpt = ["--ckpt_path", str(log_dir / "checkpoints" / "last.ckpt")]
    assert console(["validate", *args, *ckpt]) == 0
    assert console(["test", *args, *ckpt]) == 0
    # predict (the full leaderboard test files: minutes to tokenise) is in the slow test below
    assert console(["export", "--config", str(log_dir / "config.yaml"), *ckpt, "--out", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["copa", "rte", "stsb"]


def _readme_snippet() -> str:
    """The README's code that runs an exported task without speclora."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    (snippet,) = [b for b in blocks if "def load_task(" in b]
    return snippet.split("\nrte = load_task")[0]  # the definition, without the usage example


def test_exported_adapters_run_in_plain_peft_like_speclora(fitted, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from speclora.model.module import SpecLoRAModule

    args, log_dir = fitted
    last = log_dir / "checkpoints" / "last.ckpt"
    out = tmp_path / "adapters"
    assert console(["export", "--config", str(log_dir / "config.yaml"), "--ckpt_path", str(last),
                    "--out", str(out)]) == 0
    namespace: dict = {}
    exec(_readme_snippet(), namespace)  # noqa: S102 - the README's own lines, as a user would paste them
    module = SpecLoRAModule.load_from_checkpoint(last).eval()
    first = ["A man is playing a guitar on stage.", "The cat sat.", "Paris is the capital of France, a country."]
    second = ["Someone plays music.", "A dog barked loudly at the mailman.", "France has no capital."]
    tokenizer = AutoTokenizer.from_pretrained(module.backbone_name)
    batch = dict(tokenizer(first, second, padding=True, truncation=True, max_length=128, return_tensors="pt"))
    mask = batch["attention_mask"].unsqueeze(-1).float()  # (N, L, 1)
    with torch.no_grad():  # the bare encoder, mean-pooled: what the heads would see without the adapters
        bare = AutoModel.from_pretrained(module.backbone_name).eval()(**batch).last_hidden_state  # (N, L, H)
    bare = (bare * mask).sum(1) / mask.sum(1)  # (N, H)
    n = len(first)
    for t, task in [(0, "rte"), (1, "stsb")]:
        logits = namespace["load_task"](str(out / task))(first, second)  # plain peft + the README's head
        rows = {"seq_task": torch.full((n,), t), "seq_example": torch.arange(n), "task": torch.full((n,), t),
                "labels": torch.full((n,), float("nan"))}
        with torch.no_grad():
            ours = module({**batch, **rows})[t]  # speclora's own forward on the same inputs
            plain = module.heads.heads[t](bare)  # (N, C)
        if task == "rte":
            torch.testing.assert_close(logits.softmax(-1), ours.probs, atol=1e-5, rtol=1e-5)
            assert torch.equal(logits.argmax(-1), ours.preds)
        else:
            torch.testing.assert_close(logits.squeeze(-1), ours.preds, atol=1e-5, rtol=1e-5)
        assert (logits - plain).abs().max() > 1e-3  # the adapter does change the output


def test_a_dry_run_writes_no_checkpoint(tiny_backbone, data_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = _tiny_args(tiny_backbone, data_root, tmp_path / "runs", tmp_path.parent / "token_cache",
                      "--trainer.fast_dev_run", "true")
    cli = main(["fit", *args])
    assert cli.trainer.global_step == 1
    assert not list(tmp_path.rglob("*.ckpt"))


def test_an_unknown_method_is_answered_with_the_methods_that_exist(tiny_backbone, data_root, tmp_path, capsys):
    args = _tiny_args(tiny_backbone, data_root, tmp_path / "runs", tmp_path.parent / "token_cache")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *args, "--model.method", "Foo"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "model.method='Foo' is not a method; allowed: Single, Independent, Shared, Ortho, FullFT" in err
    assert "SpecLoRA, AdaLoRA, MTLoRA" in err
    with pytest.raises(SystemExit):  # a known method with a wrong option: jsonargparse's own message suffices
        main(["fit", *args, "--model.method", "Ortho", "--model.method.ordr", "fixed"])
    err = capsys.readouterr().err
    assert "Option 'ordr' is not accepted" in err and "allowed: Single" not in err


@pytest.mark.parametrize(("flag", "value", "match"), [
    ("--trainer.accelerator", "gpu", "trainer.accelerator='gpu': this machine has no CUDA device"),
    ("--trainer.accelerator", "cuda", "trainer.accelerator='cuda': this machine has no CUDA device"),
    ("--trainer.devices", "cuda:1", "trainer.devices='cuda:1': no CUDA device 1; this machine has no CUDA device"),
    ("--trainer.devices", "[1]", r"trainer.devices=\[1\]: no CUDA device 1; this machine has no CUDA device"),
])
def test_a_gpu_that_is_not_there_fails_before_training(tiny_backbone, data_root, tmp_path, monkeypatch, flag, value,
                                                       match):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine, whatever it has
    args = _tiny_args(tiny_backbone, data_root, tmp_path / "runs", tmp_path.parent / "token_cache")
    with pytest.raises(ValueError, match=match):
        main(["fit", *args, flag, value])
    assert not (tmp_path / "runs").exists()  # nothing was trained or written


@pytest.mark.slow
def test_python_m_speclora_exit_status_of_every_subcommand(tiny_backbone, data_root, tmp_path):
    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "speclora", *argv], capture_output=True, text=True,
                              env=_subprocess_env(), timeout=600)

    args = fit_args(tiny_backbone, data_root, tmp_path.parent / "token_cache", tmp_path / "runs", "suites/small.yaml")
    assert run("fit", *args).returncode == 0
    (log_dir,) = (tmp_path / "runs" / "lightning_logs").iterdir()
    ckpt = ["--ckpt_path", str(log_dir / "checkpoints" / "last.ckpt")]
    for subcommand in ("validate", "test", "predict"):
        done = run(subcommand, *args, *ckpt, "--submission.out_dir", str(tmp_path / "sub"))
        assert done.returncode == 0, (subcommand, done.stderr[-3000:])
    assert run("export", "--config", str(log_dir / "config.yaml"), *ckpt, "--out", str(tmp_path / "out")).returncode == 0
    assert run("fit", *args, "--model.method", "Foo").returncode == 2  # a parse error
    failed = run("fit", *args, "--data.tasks", "[foo]")  # an error while building the run
    assert failed.returncode == 1 and "unknown task 'foo'" in failed.stderr
