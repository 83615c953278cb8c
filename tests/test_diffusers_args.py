"""The diffusers training script's arguments as config keys (docs/diffusers_arguments.md): each does what the
script's argument does. One short training checks them together; the rest are checked without training."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from diffusers.optimization import get_scheduler
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from nemo_controlnet.config import ConfigError, report_to, validate_train_config
from nemo_controlnet.data.datamodule import ShardDataModule
from nemo_controlnet.data.indexed import shard_index
from nemo_controlnet.data.webdataset import batches, expand_shards
from nemo_controlnet.training import hub
from nemo_controlnet.training.loggers import make_loggers, wandb_logger
from nemo_controlnet.training.module import ControlNetModule, adamw_8bit
from nemo_controlnet.training.run import train
from tests.conftest import compose_train

REPO = Path(__file__).resolve().parents[1]


def first_keys(shapes_dir: Path, n: int) -> list[str]:
    """The first n samples of the training shards in the data's order (shards by name, samples as written)."""
    keys = [str(k) for url in expand_shards(str(shapes_dir / "train")) for k in shard_index(url, "jpg")[0].keys]
    return keys[:n]


@pytest.fixture
def module():
    return ControlNetModule(compose_train().model, compose_train().optim)


def test_one_run_honours_the_diffusers_keys(train_cfg, shapes_dir, monkeypatch, caplog):
    """max_train_samples, lr_scheduler/lr_power, set_grads_to_none, report_to=all, tracker_project_name,
    num_validation_images and push_to_hub (offline: HF_HUB_OFFLINE=1 in the tests) in one run."""
    seen: dict[str, list] = {"keys": [], "lr": [], "grads": []}
    step, zero = ControlNetModule.training_step, ControlNetModule.optimizer_zero_grad

    def training_step(self, batch, batch_idx):
        seen["keys"] += list(batch["key"])
        seen["lr"].append(self.trainer.optimizers[0].param_groups[0]["lr"])
        return step(self, batch, batch_idx)

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        zero(self, epoch, batch_idx, optimizer)
        grads = [p.grad for p in self.controlnet.parameters()]
        seen["grads"].append({"none" if g is None else "zeros" if not g.any() else "values" for g in grads})

    monkeypatch.setattr(ControlNetModule, "training_step", training_step)
    monkeypatch.setattr(ControlNetModule, "optimizer_zero_grad", optimizer_zero_grad)
    cfg = train_cfg(
        "data.max_train_samples=8", "trainer.max_steps=6", "checkpoint.every_n_steps=0",  # 3 epochs of 2 batches
        "optim.lr_scheduler=polynomial", "optim.lr_power=2.0", "optim.warmup_steps=1", "optim.lr=1e-3",
        "optim.set_grads_to_none=false",
        "logger=null", "report_to=all", "tracker_project_name=proj",
        "validation.num_samples=1", "validation.num_images=2",
        "export.original=false", "export.push_to_hub=true", "export.hub_model_id=me/tiny-controlnet",
        "export.base_model_id=stable-diffusion-v1-5/stable-diffusion-v1-5",
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="nemo_controlnet"):
        trainer, _ = train(cfg)
    run_dir = Path(cfg.run_dir)
    assert trainer.global_step == 6

    # data.max_train_samples: the first 8 samples, each seen once an epoch, over 3 epochs
    assert sorted(set(seen["keys"])) == sorted(first_keys(shapes_dir, 8))
    assert len(seen["keys"]) == 24 and all(seen["keys"].count(k) == 3 for k in set(seen["keys"]))

    # optim.lr_scheduler / lr_power: the rate at each step is get_scheduler's
    reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = get_scheduler("polynomial", reference, num_warmup_steps=1, num_training_steps=6, power=2.0)
    expected = []
    for _ in range(6):
        expected.append(reference.param_groups[0]["lr"])
        reference.step()
        scheduler.step()
    assert np.allclose(seen["lr"], expected, rtol=1e-6, atol=0), (seen["lr"], expected)
    linear = get_scheduler("polynomial", torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3),
                           num_warmup_steps=1, num_training_steps=6, power=1.0)  # fmt: skip
    assert linear.lr_lambdas[0](3) != scheduler.lr_lambdas[0](3)  # the power made a difference

    # optim.set_grads_to_none=false: after the first step, zero_grad leaves zero-filled gradients
    assert seen["grads"][0] == {"none"} and all(g == {"zeros"} for g in seen["grads"][1:]), seen["grads"]

    # report_to=all: TensorBoard, CSV and W&B (in the dev extra; offline: a run folder to `wandb sync` later)
    assert {type(lg) for lg in trainer.loggers} == {TensorBoardLogger, CSVLogger, WandbLogger}
    offline = list((run_dir / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0, offline
    assert "wandb sync" in caplog.text
    assert list((run_dir / "logs" / "proj").glob("events.out.tfevents.*"))
    rows = (run_dir / "logs" / "proj" / "version_0" / "metrics.csv").read_text()
    assert "train/loss" in rows and "lr-AdamW" in rows and "validation/" in rows

    # validation.num_images=2: each row hint | two images, of different seeds
    grid = np.asarray(Image.open(run_dir / "samples" / "step_0000006.png"))
    assert grid.shape == (64, 3 * 64, 3)
    assert not np.array_equal(grid[:, 64:128], grid[:, 128:])

    # export.push_to_hub offline: the export is the upload-ready folder, the log says how to upload it
    card = (run_dir / "controlnet" / "README.md").read_text()
    assert "hf download me/tiny-controlnet --local-dir" in card and "diffusers-training" in card
    assert 'from_pretrained("path/to/this/directory", local_files_only=True)' in card  # loads offline
    assert "base_model: stable-diffusion-v1-5/stable-diffusion-v1-5" in card
    assert (run_dir / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()
    assert f"hf upload me/tiny-controlnet {run_dir / 'controlnet'} ." in caplog.text


@pytest.mark.parametrize("access", ["indexed", "stream"])
def test_max_train_samples_are_the_first_n_in_both_access_modes(train_cfg, shapes_dir, access):
    """20 samples: the whole first shard (16) and the first 4 of the second, every epoch, nothing else."""
    cfg = train_cfg("data.max_train_samples=20", f"data.access={access}")
    data = ShardDataModule(cfg.data, 3, int(cfg.seed))
    data.setup("fit")
    keys = [k for b in zip(range(15), batches(data.train_dataloader())) for k in b[1]["key"]]  # 3 epochs of 5
    assert sorted(set(keys)) == sorted(first_keys(shapes_dir, 20))
    assert all(keys.count(k) == 3 for k in set(keys))
    assert set(first_keys(shapes_dir, 16)) <= set(keys)  # the first shard whole


def test_max_train_samples_of_a_streamed_parquet_dataset_are_its_first_rows(tmp_path):
    """data=hf_dataset on parquet (streamed by row group): the first 6 rows, across row groups of 4."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pytest.importorskip("datasets")
    rows = []
    for i in range(12):
        image = Image.fromarray(np.full((64, 64, 3), i * 20, dtype=np.uint8))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        rows.append(buffer.getvalue())
    table = pa.table({"image": rows, "conditioning_image": rows, "text": [f"row {i}" for i in range(12)]})
    pq.write_table(table, tmp_path / "train.parquet", row_group_size=4)
    cfg = compose_train(["data=hf_dataset", f"data.hf.path={tmp_path / 'train.parquet'}", "data.synthetic=null",
                         "data.max_train_samples=6", "data.batch_size=2", "data.num_workers=0",
                         "data.resolution=64"])  # fmt: skip
    data = ShardDataModule(cfg.data, 3, 0)
    data.setup("fit")
    keys = [k for b in zip(range(6), batches(data.train_dataloader())) for k in b[1]["key"]]  # 2 epochs of 3
    assert data.access == "stream" and sorted(set(keys)) == [f"{i:09d}" for i in range(6)]
    assert all(keys.count(k) == 2 for k in set(keys))


@pytest.mark.parametrize(
    ("name", "options", "other"),
    [
        ("cosine_with_restarts", {"lr_num_cycles": 3}, {"lr_num_cycles": 1}),
        ("polynomial", {"lr_power": 3.0}, {"lr_power": 1.0}),
        ("linear", {}, None),
        ("constant_with_warmup", {}, None),
    ],
)
def test_lr_scheduler_keys_give_get_schedulers_curve(module, name, options, other):
    def curve(opts: dict) -> list[float]:
        module.optim_cfg = OmegaConf.merge(compose_train().optim, {"lr_scheduler": name, "warmup_steps": 2, **opts})
        module.trainer = L.Trainer(max_steps=20, logger=False, enable_checkpointing=False)
        scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
        return [scheduler.lr_lambdas[0](s) for s in range(20)]

    reference = get_scheduler(
        name, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4), num_warmup_steps=2,
        num_training_steps=20, num_cycles=options.get("lr_num_cycles", 1), power=options.get("lr_power", 1.0),
    )  # fmt: skip
    ours = curve(options)
    assert np.allclose(ours, [reference.lr_lambdas[0](s) for s in range(20)])
    if other is not None:
        assert not np.allclose(ours, curve(other))  # the key changes the curve


@pytest.mark.parametrize("to_none", [True, False])
def test_set_grads_to_none(module, to_none):
    module.optim_cfg = OmegaConf.merge(module.optim_cfg, {"set_grads_to_none": to_none})
    params = [p for p in module.controlnet.parameters()][:3]
    optimizer = torch.optim.AdamW(params)
    for p in params:
        p.grad = torch.ones_like(p)
    module.optimizer_zero_grad(0, 0, optimizer)
    assert all((p.grad is None) if to_none else (p.grad is not None and not p.grad.any()) for p in params)


def test_report_to_and_logger_resolve_to_loggers(tmp_path, monkeypatch):
    assert report_to(compose_train()) == ["tensorboard"]  # both null: as before
    assert report_to(compose_train(["logger=csv"])) == ["csv"]  # the older name still works
    assert report_to(compose_train(["report_to=csv", "logger=csv"])) == ["csv"]  # both, alike
    assert report_to(compose_train(["report_to=[csv,tensorboard]"])) == ["tensorboard", "csv"]
    assert report_to(compose_train(["report_to=none"])) == []
    assert report_to(compose_train(["report_to=all"])) == ["tensorboard", "csv", "wandb"]  # wandb: in the dev extra
    with pytest.raises(ConfigError, match=r"report_to='csv' and logger='tensorboard' disagree"):
        validate_train_config(compose_train(["report_to=csv", "logger=tensorboard"]))
    validate_train_config(compose_train(["report_to=wandb"]))  # installed: fine
    # A machine without wandb: all means tensorboard and csv, and asking for wandb names the install.
    monkeypatch.setattr("nemo_controlnet.config.installed", lambda name: name != "wandb")
    assert report_to(compose_train(["report_to=all"])) == ["tensorboard", "csv"]
    with pytest.raises(ConfigError, match=r"report_to='wandb'.*pip install wandb"):
        validate_train_config(compose_train(["report_to=wandb"]))
    with pytest.raises(ConfigError, match=r"logger='wandb'.*pip install wandb"):
        validate_train_config(compose_train(["logger=wandb"]))
    with pytest.raises(ConfigError, match=r"report_to='comet_ml': expected tensorboard, csv, wandb, all or none"):
        validate_train_config(compose_train(["report_to=comet_ml"]))

    cfg = compose_train(["report_to=all", "tracker_project_name=proj"])
    loggers = make_loggers(cfg, tmp_path)
    assert [type(lg) for lg in loggers] == [TensorBoardLogger, CSVLogger]
    assert Path(loggers[0].log_dir) == tmp_path / "logs" / "proj"
    assert Path(loggers[1].log_dir).parent == tmp_path / "logs" / "proj"
    loggers = make_loggers(compose_train(["report_to=tensorboard"]), tmp_path)
    assert Path(loggers[0].log_dir) == tmp_path / "logs"  # where it always was (the UI reads logs/)
    assert make_loggers(compose_train(["report_to=none"]), tmp_path) == []


def test_wandb_logger_is_offline_unless_online_is_asked(monkeypatch, tmp_path):
    """The logger's wandb.init arguments: offline unless asked, the project, the run's name and config."""
    cfg = compose_train(["report_to=wandb", "tracker_project_name=proj", f"run_dir={tmp_path / 'r'}"])
    logger = wandb_logger(cfg, tmp_path / "r")
    init = logger._wandb_init
    assert (init["mode"], init["project"], init["name"]) == ("offline", "proj", "r") and logger._offline
    assert init["dir"] == str(tmp_path / "r" / "logs") and init["config"]["optim"]["lr"] == cfg.optim.lr
    cfg = compose_train(["report_to=wandb", "wandb.mode=online", "wandb.entity=team"])
    init = wandb_logger(cfg, tmp_path / "r")._wandb_init
    assert (init["mode"], init["project"], init["entity"]) == ("online", "nemo_controlnet", "team")
    with pytest.raises(ConfigError, match=r"wandb.mode='sometimes'"):
        monkeypatch.setattr("nemo_controlnet.config.installed", lambda name: True)
        validate_train_config(compose_train(["report_to=wandb", "wandb.mode=sometimes"]))


def test_8bit_adam_needs_cuda_and_bitsandbytes(monkeypatch, module):
    with pytest.raises(ConfigError, match=r"optim.use_8bit_adam=true: 8-bit Adam needs CUDA"):
        validate_train_config(compose_train(["optim.use_8bit_adam=true"]))
    with pytest.raises(ConfigError, match=r"8-bit Adam needs CUDA.*trainer.accelerator=cpu"):
        validate_train_config(compose_train(["optim.use_8bit_adam=true", "trainer.accelerator=cpu"]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine without bitsandbytes
    monkeypatch.setattr("nemo_controlnet.config.installed", lambda name: name != "bitsandbytes")
    with pytest.raises(ConfigError, match=r"bitsandbytes is not installed \(pip install bitsandbytes\)"):
        validate_train_config(compose_train(["optim.use_8bit_adam=true"]))
    groups = [{"params": list(module.controlnet.parameters())[:2], "lr": 1e-4, "name": "controlnet"}]
    with pytest.raises(RuntimeError, match="8-bit Adam needs CUDA"):
        adamw_8bit(groups, module.optim_cfg, torch.device("cpu"))


def test_push_to_hub_uploads_the_folder_when_online_and_says_how_when_not(monkeypatch, tmp_path, caplog):
    import huggingface_hub
    import huggingface_hub.constants

    folder = tmp_path / "controlnet"
    folder.mkdir()
    (folder / "README.md").write_text("card")
    calls = []
    monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", lambda: False)
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, exist_ok: calls.append(("create", repo_id)))

    def upload_folder(**kwargs):
        calls.append(("upload", kwargs["repo_id"], kwargs["folder_path"]))
        return type("Info", (), {"commit_url": "https://hub/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    assert hub.push_to_hub(folder, "me/x", 5) == "https://hub/commit/1"
    assert calls == [("create", "me/x"), ("upload", "me/x", str(folder))]

    def no_network(**kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub, "upload_folder", no_network)
    with caplog.at_level(logging.INFO, logger="nemo_controlnet"):
        assert hub.push_to_hub(folder, "me/x", 5) is None  # the run does not fail
    assert "no route to host" in caplog.text and f"hf upload me/x {folder} ." in caplog.text
    cfg = compose_train(["export.push_to_hub=true", "run_dir=runs/my-run"])
    assert hub.hub_model_id(cfg.export, Path(cfg.run_dir)) == "my-run"  # diffusers: the output_dir's name
    with pytest.raises(ConfigError, match="export.push_to_hub=true uploads what the run exports"):
        validate_train_config(compose_train(["export.push_to_hub=true", "export.enabled=false"]))


DIFFUSERS_ARGUMENTS = """pretrained_model_name_or_path controlnet_model_name_or_path revision variant tokenizer_name
output_dir cache_dir seed resolution train_batch_size num_train_epochs max_train_steps checkpointing_steps
checkpoints_total_limit resume_from_checkpoint gradient_accumulation_steps gradient_checkpointing learning_rate
scale_lr lr_scheduler lr_warmup_steps lr_num_cycles lr_power use_8bit_adam dataloader_num_workers adam_beta1
adam_beta2 adam_weight_decay adam_epsilon max_grad_norm push_to_hub hub_token hub_model_id logging_dir allow_tf32
report_to mixed_precision enable_xformers_memory_efficient_attention set_grads_to_none dataset_name
dataset_config_name train_data_dir image_column conditioning_image_column caption_column max_train_samples
proportion_empty_prompts validation_prompt validation_image num_validation_images validation_steps
tracker_project_name""".split()


def test_the_mapping_doc_names_every_argument_and_only_keys_that_exist():
    text = (REPO / "docs" / "diffusers_arguments.md").read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `--(\w+)` \| (.*?) \|", text, re.M)}
    assert set(DIFFUSERS_ARGUMENTS) <= set(rows), set(DIFFUSERS_ARGUMENTS) - set(rows)
    # the keys of the default config, and of the groups the table names (model=local_diffusers, data=hf_dataset)
    cfgs = [compose_train(), compose_train(["model=local_diffusers", "data=hf_dataset"])]

    def has(cfg, key: str) -> bool:  # null and ??? values count: the key is there
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent, throw_on_missing=False) if parent else cfg
        return isinstance(node, DictConfig) and leaf in node.keys()  # (`in` says no to ???)

    for argument, ours in rows.items():
        for key in re.findall(r"`([a-z_]+(?:\.[a-z_0-9]+)+|report_to|logger|seed|resume|run_dir|tracker_project_name)`",
                              ours):  # fmt: skip
            assert any(has(c, key) for c in cfgs), f"--{argument}: no key {key}"
