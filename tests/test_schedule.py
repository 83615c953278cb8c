"""control_training_schedule (training/schedule.py): which parameters move in each phase of a real fit,
the phase in the logs, bad keys refused by name; what a checkpoint records and the resumes it refuses;
the DEBUG lines at the risky steps (control tensors' devices and dtypes, the ControlNet's swaps)."""

import csv
import logging
import re

import pytest
import torch
from omegaconf import OmegaConf

from nemo_controlnet.training.module import ControlNetModule
from nemo_controlnet.training.run import research_options, train
from nemo_controlnet.training.schedule import Schedule, parse_schedule


@pytest.fixture
def pretrained(pretrained_controlnet):
    """The tiny base's 'pretrained' ControlNet (tests/conftest.py)."""
    return pretrained_controlnet


def adapter_cfg(train_cfg, pretrained, *overrides):
    cfg = train_cfg("+experiment=lora_frozen_controlnet", f"controlnet.name_or_path={pretrained}", "adapter.rank=4",
                    "adapter.alpha=4", "adapter.lr=1e-2", "controlnet.lr=1e-3", "optim.warmup_steps=0",
                    "validation.num_samples=0", "export.enabled=false", "perf.count_flops=false",
                    *overrides)  # fmt: skip
    OmegaConf.resolve(cfg)
    return cfg


def build(cfg) -> ControlNetModule:
    return ControlNetModule(cfg.model, cfg.optim, adapter_cfg=cfg.get("adapter"), controlnet_cfg=cfg.get("controlnet"),
                            mode=cfg.get("training_mode"), research=research_options(cfg))  # fmt: skip


def spy_steps(monkeypatch) -> list[tuple[int, set[str]]]:
    """(global_step, which of controlnet / adapter changed) per optimizer step of the fit, observed
    around Lightning's optimizer_step (the real fit runs unchanged)."""
    seen = []
    original = ControlNetModule.optimizer_step

    def step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        named = {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}
        global_step = self.trainer.global_step
        original(self, epoch, batch_idx, optimizer, optimizer_closure)
        changed = {"adapter" if "lora_" in n else "controlnet" for n, p in self.named_parameters()
                   if p.requires_grad and not torch.equal(p.detach(), named[n])}  # fmt: skip
        seen.append((global_step, changed))

    monkeypatch.setattr(ControlNetModule, "optimizer_step", step)
    return seen


def logged_phases(run_dir) -> dict[int, float]:
    (path,) = run_dir.glob("logs/**/metrics.csv")
    rows = list(csv.DictReader(path.open()))
    return {int(r["step"]): float(r["train/phase"]) for r in rows if r.get("train/phase")}


BOTH = {"controlnet", "adapter"}


@pytest.mark.parametrize("schedule, overrides, expected", [
    ("standard", [], [BOTH] * 4),
    ("ping_pong", ["schedule.period=2"], [{"controlnet"}] * 2 + [{"adapter"}] * 2 + [{"controlnet"}]),
    ("alternate", ["schedule.phases=[adapter,both]", "schedule.period=7"], [{"adapter"}, BOTH] * 2),
    # gradient accumulation: a phase counts optimizer steps, not batches
    ("alternate", ["trainer.accumulate_grad_batches=2"], [{"controlnet"}, {"adapter"}] * 2),
])  # fmt: skip
def test_each_phase_moves_only_its_parameters(train_cfg, pretrained, tmp_path, monkeypatch, schedule, overrides,
                                              expected):  # fmt: skip
    cfg = adapter_cfg(train_cfg, pretrained, "controlnet.train=true", f"control_training_schedule={schedule}",
                      f"trainer.max_steps={len(expected)}", "checkpoint.every_n_steps=0", *overrides)  # fmt: skip
    seen = spy_steps(monkeypatch)
    trainer, module = train(cfg)
    assert [s for s, _ in seen] == list(range(len(expected)))  # one record per optimizer step
    assert [changed for _, changed in seen] == expected
    if schedule == "standard":
        assert not logged_phases(tmp_path / "run")  # nothing new in the logs of a standard run
        return
    logged = logged_phases(tmp_path / "run")
    assert sorted(logged) == list(range(1, len(expected) + 1))  # every step, under train/loss's step numbers
    steps = range(len(expected))
    assert [logged[s + 1] for s in steps] == [module.schedule.phase_index(s) for s in steps]
    optimizer = trainer.optimizers[0]
    state = {g["role"]: [optimizer.state.get(p, {}) for p in g["params"]] for g in optimizer.param_groups}
    if schedule == "ping_pong":  # 5 steps: the ControlNet stepped 3 times, the adapter twice (its moments waited)
        assert int(state["controlnet"][0]["step"]) == 3 and int(state["adapter"][0]["step"]) == 2


def test_a_rested_group_is_neither_moved_nor_decayed(train_cfg, pretrained, monkeypatch):
    """Weight decay too: AdamW skips a parameter without a gradient, so a resting part stays bit-identical."""
    cfg = adapter_cfg(train_cfg, pretrained, "controlnet.train=true", "control_training_schedule=ping_pong",
                      "schedule.period=3", "trainer.max_steps=3", "optim.weight_decay=0.5",
                      "checkpoint.every_n_steps=0")  # fmt: skip
    seen = spy_steps(monkeypatch)
    start = build(cfg)
    before = {n: p.detach().clone() for n, p in start.unet.named_parameters() if "lora_" in n}
    _, module = train(cfg)
    assert [c for _, c in seen] == [{"controlnet"}] * 3
    assert all(torch.equal(p.detach().cpu(), before[n]) for n, p in module.unet.named_parameters() if "lora_" in n)


def test_bad_schedule_keys_are_refused_naming_the_key(train_cfg, pretrained):
    with pytest.raises(ValueError, match="control_training_schedule='zigzag'"):
        parse_schedule({"control_training_schedule": "zigzag"})
    with pytest.raises(ValueError, match="schedule.period=0"):
        parse_schedule({"control_training_schedule": "ping_pong", "schedule": {"period": 0, "phases": ["adapter"]}})
    with pytest.raises(ValueError, match="schedule.period='often'"):
        parse_schedule({"control_training_schedule": "ping_pong", "schedule": {"period": "often", "phases": ["a"]}})
    with pytest.raises(ValueError, match="schedule.phases=\\[\\]"):
        parse_schedule({"control_training_schedule": "alternate", "schedule": {"period": 1, "phases": []}})
    # alternate ignores the period (every step switches); standard ignores both
    assert parse_schedule({"control_training_schedule": "alternate", "schedule": {"period": 0, "phases": ["x"]}}) \
        == Schedule("alternate", 1, ("x",))  # fmt: skip
    assert parse_schedule({"schedule": {"period": -1}}) == Schedule()
    # a phase naming a role the run's mode does not train: plain controlnet mode has no adapter
    with pytest.raises(ValueError, match=r"schedule.phases\[1\]='adapter': this run \(training_mode controlnet\)"):
        build(train_cfg("control_training_schedule=ping_pong"))
    with pytest.raises(ValueError, match=r"schedule.phases\[0\]='contrlnet'"):
        build(train_cfg("control_training_schedule=alternate", "schedule.phases=[contrlnet,controlnet]"))
    # adapter mode with a frozen ControlNet trains the adapter only
    with pytest.raises(ValueError, match=r"schedule.phases\[0\]='controlnet'.*training_mode adapter"):
        build(adapter_cfg(train_cfg, pretrained, "control_training_schedule=ping_pong"))
    with pytest.raises(ValueError, match=r"no phase trains \['controlnet'\]"):
        build(adapter_cfg(train_cfg, pretrained, "controlnet.train=true", "control_training_schedule=alternate",
                          "schedule.phases=[adapter]"))  # fmt: skip
    assert build(train_cfg("control_training_schedule=ping_pong", "schedule.phases=[controlnet]")).schedule.period == 50


def test_checkpoint_meta(train_cfg, pretrained, tmp_path):
    """A checkpoint records mode, adapter, schedule and reroute; a resume under another adapter type, schedule
    or reroute is refused naming the key and both values; a checkpoint from before these keys still loads."""
    options = ["controlnet.train=true", "control_training_schedule=ping_pong", "schedule.period=1",
               "controlnet_reroute=always"]  # fmt: skip
    cfg = adapter_cfg(train_cfg, pretrained, *options, "trainer.max_steps=2", "checkpoint.every_n_steps=2")
    train(cfg)
    path = tmp_path / "run" / "checkpoints" / "step=0000002.ckpt"
    ckpt = torch.load(path, weights_only=True)
    meta = ckpt["nemo_controlnet"]
    assert meta["mode"] == "adapter" and meta["adapter"] == "lora" and meta["reroute"] == "always"
    assert meta["schedule"] == {"kind": "ping_pong", "period": 1, "phases": ["controlnet", "adapter"]}

    def refusal(*changed):
        module = build(adapter_cfg(train_cfg, pretrained, *options, *changed))
        with pytest.raises(RuntimeError) as e:
            module.on_load_checkpoint(torch.load(path, weights_only=True))
        return str(e.value)

    assert "control_training_schedule='ping_pong', but this run has control_training_schedule='alternate'" in refusal(
        "control_training_schedule=alternate", "schedule.period=1")  # fmt: skip
    assert "schedule.period=1, but this run has schedule.period=3" in refusal("schedule.period=3")
    assert "schedule.phases=['controlnet', 'adapter'], but this run has schedule.phases=['adapter', 'controlnet']" in (
        refusal("schedule.phases=[adapter,controlnet]"))  # fmt: skip
    assert "controlnet_reroute='always', but this run has controlnet_reroute='none'" in refusal(
        "controlnet_reroute=none")  # fmt: skip
    assert "adapter.type='lora', but this run has adapter.type='lokr'" in refusal("adapter.type=lokr")
    # the same options load; so does a checkpoint written before schedule, reroute (and adapter) were recorded
    build(adapter_cfg(train_cfg, pretrained, *options)).on_load_checkpoint(torch.load(path, weights_only=True))
    old = torch.load(path, weights_only=True)
    for key in ("schedule", "reroute", "adapter"):
        del old["nemo_controlnet"][key]
    other = build(adapter_cfg(train_cfg, pretrained, "controlnet.train=true", "controlnet_reroute=none"))
    other.on_load_checkpoint(old)
    # through the trainer: a resume under another schedule stops before any step
    with pytest.raises(RuntimeError, match="control_training_schedule='ping_pong', but this run has .*'standard'"):
        train(adapter_cfg(train_cfg, pretrained, "controlnet.train=true", "trainer.max_steps=4"))


def test_debug_logs_name_the_control_tensors_and_each_swap(train_cfg, pretrained, caplog):
    """At DEBUG: the hint's and residuals' devices and dtypes at the first batch; each manual swap of the
    frozen ControlNet, its direction, tensors, bytes and time."""
    cfg = adapter_cfg(train_cfg, pretrained, "controlnet.offload_strategy=manual_swap", "trainer.max_steps=2",
                      "checkpoint.every_n_steps=0")  # fmt: skip
    with caplog.at_level(logging.DEBUG, logger="nemo_controlnet"):
        train(cfg)
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("control: hint 1 tensor(s) on cpu in float32") for m in lines), lines
    assert any(m.startswith("control: the ControlNet's residuals ") and "on cpu in float32" in m for m in lines)
    assert any(m.startswith("control: the UNet receives residuals ") for m in lines)
    assert sum(m.startswith("control: hint") for m in lines) == 1  # the first batch only
    swaps = [m for m in lines if m.startswith("manual_swap: ControlNet")]
    into = [m for m in swaps if "host -> device" in m]
    assert len(into) == 2 and len(swaps) >= 4  # one swap in and out per step (and out once when installed)
    assert " tensors, " in into[0] and " MiB, " in into[0] and " ms on the host" in into[0]


@pytest.mark.parametrize("overrides, message", [
    (["control_training_schedule=zigzag"], "control_training_schedule='zigzag'"),
    (["controlnet_reroute=sometimes"], "controlnet_reroute='sometimes'"),
    (["controlnet_reroute=none"], "controlnet_reroute=none: routes"),  # a ControlNet run has no adapter
    (["+experiment=lora_frozen_controlnet", "controlnet.name_or_path=/x", "controlnet_reroute=precompute"],
     "needs residuals.dir"),
    (["+experiment=lora_frozen_controlnet", "controlnet.name_or_path=/x", "controlnet_reroute=precompute",
      "residuals.dir=/r", "residuals.on_mismatch=ignore"], "residuals.on_mismatch='ignore'"),
])  # fmt: skip
def test_research_keys_are_checked_before_anything_loads(overrides, message):
    from nemo_controlnet.training.run import check_research_options
    from tests.conftest import compose_train

    check_research_options(compose_train([]))  # the defaults pass
    with pytest.raises(ValueError, match=re.escape(message)):
        check_research_options(compose_train(overrides))
