"""Auxiliary losses (controlnet.aux_loss, training/aux_loss.py): edge_loss (ControlNet++) and masked_recon
(LumiCtrl), the mask member the loader carries for it, their logging and their config errors."""

import csv
import io
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from omegaconf import OmegaConf
from PIL import Image

from nemo_controlnet.config import ConfigError, validate_train_config
from nemo_controlnet.data.datamodule import make_decoder
from nemo_controlnet.data.layout import MASK, MASK_PRESENT
from nemo_controlnet.data.transforms import normalize_batch
from nemo_controlnet.data.webdataset import SampleDecoder, collate
from nemo_controlnet.training.aux_loss import EdgeLoss, MaskedRecon, make_aux_loss, pixel_mask
from nemo_controlnet.training.module import ControlNetModule
from nemo_controlnet.training.run import train
from tests.conftest import compose_train

REPO = Path(__file__).resolve().parents[1]
TOY = ["model=toy", "data.resolution=32", "model.control_stage_config.conditioning_embedding_out_channels=[16,32]"]


def _module(*overrides: str) -> ControlNetModule:
    cfg = compose_train(["model.proportion_empty_prompts=0.0", *overrides])
    torch.manual_seed(0)
    return ControlNetModule(cfg.model, cfg.optim, controlnet_cfg=cfg.controlnet)


def _batch(size: int = 64, n: int = 2) -> dict:
    g = torch.Generator().manual_seed(1)
    hint = torch.zeros(n, 3, size, size)
    hint[:, :, size // 4 : 3 * size // 4, size // 2] = 1.0  # a vertical edge line
    return {"image": torch.rand(n, 3, size, size, generator=g) * 2 - 1, "hint": hint, "caption": ["a", "b"][:n]}


def _force_timesteps(monkeypatch, module, timesteps: list[int]) -> None:
    """The family's draw with these timesteps (noise still from the global generator)."""
    scheduler = module.noise_scheduler

    def noise(stack, latents):
        eps = torch.randn(latents.shape)
        t = torch.tensor(timesteps)
        target = eps if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, eps, t)
        return scheduler.add_noise(latents, eps, t), t, target

    monkeypatch.setattr(module.family, "noise", noise)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# -- none ------------------------------------------------------------------------------------------
def test_none_gives_exactly_the_old_loss():
    module = _module()  # controlnet.aux_loss=none, the default
    assert module.aux_loss is None
    batch = _batch()
    torch.manual_seed(3)
    loss = module.diffusion_loss(dict(batch))
    # The old loss by hand, from the same draws: MSE of the controlled prediction to the target.
    torch.manual_seed(3)
    with torch.no_grad():
        latents = module.family.latents(module, batch, module.locked_dtype)
        cond = module.family.conditioning(module, batch, module.encode_prompts(batch["caption"]), latents)
        noisy, t, target = module.family.noise(module, latents)
        residuals = module.training_mode.control_residuals(module, batch, noisy, t, cond)
        pred = module.family.denoise(module.unet, noisy, t, cond, residuals)
    assert torch.equal(loss.detach(), F.mse_loss(pred.float(), target.float()))
    # The same weights and draws with an auxiliary loss give another value: the comparison can tell.
    masked = _module("controlnet.aux_loss=masked_recon", "controlnet.aux_loss_weight=1.0")
    torch.manual_seed(3)
    assert not torch.equal(masked.diffusion_loss(dict(batch)).detach(), loss.detach())


# -- edge_loss -------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predicted_x0_inverts_the_forward_process(prediction_type):
    module = _module()
    scheduler = module.noise_scheduler
    scheduler.register_to_config(prediction_type=prediction_type)
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 150, 999])
    noisy = scheduler.add_noise(x0, eps, t)
    exact = eps if prediction_type == "epsilon" else scheduler.get_velocity(x0, eps, t)
    torch.testing.assert_close(module.family.predicted_x0(module, noisy, t, exact), x0, atol=2e-3, rtol=1e-3)
    wrong = scheduler.get_velocity(x0, eps, t) if prediction_type == "epsilon" else eps
    assert not torch.allclose(module.family.predicted_x0(module, noisy, t, wrong)[1:], x0[1:], atol=0.1)


def test_edge_loss_only_at_small_timesteps_and_its_gradient_reaches_the_controlnet(monkeypatch):
    module = _module("controlnet.aux_loss=edge_loss", "controlnet.aux_t_max=200", "controlnet.aux_loss_weight=1.0")
    aux = module.aux_loss
    assert isinstance(aux, EdgeLoss) and aux.t_max == 200 and aux.weight == 1.0
    decoded = []
    decode = module.family.decode
    monkeypatch.setattr(module.family, "decode", lambda stack, z: decoded.append(len(z)) or decode(stack, z))
    batch = _batch()

    # Every sample above t_max: no decode, the term is 0 and the loss is the plain MSE.
    _force_timesteps(monkeypatch, module, [900, 950])
    torch.manual_seed(3)
    loss = module.diffusion_loss(dict(batch))
    assert decoded == [] and aux.last == 0
    plain = _module()
    _force_timesteps(monkeypatch, plain, [900, 950])
    torch.manual_seed(3)
    assert torch.equal(loss.detach(), plain.diffusion_loss(dict(batch)).detach())

    # One sample at t <= t_max: only it is decoded; the term's gradient reaches the ControlNet's weights
    # (through the locked UNet and the locked VAE, which get none).
    _force_timesteps(monkeypatch, module, [50, 900])
    torch.manual_seed(3)
    with torch.no_grad():
        latents = module.family.latents(module, batch, module.locked_dtype)
        cond = module.family.conditioning(module, batch, module.encode_prompts(batch["caption"]), latents)
    noisy, t, target = module.training_mode.noise(module, batch, latents)
    residuals = module.training_mode.control_residuals(module, batch, noisy, t, cond)
    pred = module.family.denoise(module.unet, noisy, t, cond, residuals)
    term = aux(module, batch, latents, noisy, t, pred, target)
    assert decoded == [1] and term > 0 and torch.equal(aux.last, term.detach())
    term.backward()
    grads = [p.grad for p in module.controlnet.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in [*module.vae.parameters(), *module.unet.parameters()])

    # The sample above t_max does not contribute: no gradient to its prediction, and changing it changes nothing.
    leaf = pred.detach().clone().requires_grad_(True)
    term = aux(module, batch, latents, noisy, t, leaf, target)
    term.backward()
    assert leaf.grad[1].abs().sum() == 0 and leaf.grad[0].abs().sum() > 0
    other = leaf.detach().clone()
    other[1] += 5.0
    assert torch.equal(aux(module, batch, latents, noisy, t, other, target), term.detach())
    other[0] += 0.5
    assert not torch.equal(aux(module, batch, latents, noisy, t, other, target), term.detach())


def test_edge_loss_prefers_an_x0_whose_edges_are_the_hint_on_the_pixel_autoencoder():
    # examples/fill50k's base: the weightless 2x pixel autoencoder at 32 px (it decodes what it encodes), v target.
    module = _module(*TOY, "controlnet.aux_loss=edge_loss", "controlnet.aux_loss_weight=1.0")
    assert module.noise_scheduler.config.prediction_type == "v_prediction" and module.vae.factor == 2
    image = np.zeros((32, 32, 3), np.uint8)
    cv2.circle(image, (16, 16), 9, (255, 255, 255), -1)
    hint = torch.from_numpy(cv2.Canny(image, 100, 200)).float().div(255)[None, None].expand(1, 3, 32, 32)
    batch = {"image": torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1, "hint": hint}
    latents = module.family.latents(module, batch, torch.float32)
    scheduler, t = module.noise_scheduler, torch.tensor([20])
    eps = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    noisy = scheduler.add_noise(latents, eps, t)

    def term_for(x0: torch.Tensor) -> float:
        # the v prediction whose one-step estimate is x0
        a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        pred = (a.sqrt() * noisy - x0) / (1 - a).sqrt()
        torch.testing.assert_close(module.family.predicted_x0(module, noisy, t, pred), x0, atol=1e-4, rtol=1e-4)
        return float(module.aux_loss(module, batch, latents, noisy, t, pred, None))

    perfect, blank = term_for(latents), term_for(torch.zeros_like(latents))  # blank: a flat grey image
    shifted = term_for(torch.roll(latents, 4, dims=-1))  # the disk 8 px off the hint's edges
    assert perfect < 0.5 * blank and perfect < shifted


# -- masked_recon ----------------------------------------------------------------------------------
def test_masked_recon_sees_only_the_dilated_hint_on_the_latent_grid():
    aux = make_aux_loss(OmegaConf.create({"aux_loss": "masked_recon", "aux_loss_weight": 2.0, "aux_mask_dilate": 3}))
    assert isinstance(aux, MaskedRecon)
    module = SimpleNamespace(control_key="hint")
    hint = torch.zeros(1, 3, 64, 64)
    hint[0, 1, 12:50, 20] = 0.5  # a one-pixel line at x=20, in one channel: dilated to x 17..23, latent column 2
    pred, target = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)

    def term(p: torch.Tensor, h: torch.Tensor = hint, batch: dict | None = None) -> torch.Tensor:
        return aux(module, {**(batch or {}), "hint": h}, None, None, None, p, target)

    base = term(pred)
    outside, inside = pred.clone(), pred.clone()
    outside[..., 5] += 3.0  # latent column 5: pixels 40..47, far from the line
    outside[..., 0:1, :] += 3.0  # latent row 0 (pixels 0..7) lies above the line (rows 12..49, dilated 9..52)
    inside[0, 2, 3, 2] += 3.0
    assert torch.equal(term(outside), base) and not torch.equal(term(inside), base)
    # One-pixel lines survive: a line at x=23 with no dilation still marks latent column 2.
    thin = make_aux_loss({"aux_loss": "masked_recon", "aux_mask_dilate": 0})
    line = torch.zeros(1, 1, 64, 64)
    line[0, 0, 30, 23] = 1.0
    assert pixel_mask({}, line, 0).sum() == 1
    assert thin(module, {"hint": line}, None, None, None, inside, target) != thin(
        module, {"hint": line}, None, None, None, pred, target
    )
    # Max-pooled, not averaged: a latent cell touched by one pixel weighs as much as a full one.
    cells = torch.zeros(1, 1, 64, 64)
    cells[0, 0, :8, :8] = 1.0  # latent cell (0, 0), full
    cells[0, 0, 63, 63] = 1.0  # latent cell (7, 7), one pixel
    spot = target.clone()
    spot[0, :, 7, 7] += 1.0  # an error of 1 in the one-pixel cell only
    torch.testing.assert_close(thin(module, {"hint": cells}, None, None, None, spot, target), torch.tensor(0.1 / 2))
    # Normalised by the mask's area: a uniform error gives weight * error^2 whatever the mask's size.
    uniform = target + 0.5
    small, large = hint.clone(), torch.ones_like(hint)
    torch.testing.assert_close(term(uniform, small), torch.tensor(2.0 * 0.25))
    torch.testing.assert_close(term(uniform, large), torch.tensor(2.0 * 0.25))
    # An empty mask contributes 0, not NaN, with a finite gradient.
    leaf = pred.clone().requires_grad_(True)
    empty = term(leaf, torch.zeros_like(hint))
    empty.backward()
    assert empty == 0 and torch.isfinite(leaf.grad).all() and aux.last == 0


def test_a_mask_member_wins_over_the_hint_derived_mask():
    hint = torch.zeros(2, 3, 64, 64)
    hint[:, :, 10:50, 20] = 1.0
    own = torch.zeros(2, 1, 64, 64, dtype=torch.uint8)
    own[:, :, :, 40:48] = 255  # latent column 5
    batch = normalize_batch({"hint": hint, MASK: own, MASK_PRESENT: torch.tensor([True, False])})
    assert batch[MASK].dtype == torch.float32 and batch[MASK].max() == 1.0
    mask = pixel_mask(batch, batch["hint"], 3)
    assert torch.equal(mask[0], own[0].float() / 255)  # its own mask, not dilated, the hint ignored
    assert mask[1, 0, 30, 17:24].eq(1).all() and mask[1, 0, :, 40:48].eq(0).all()  # no member: the hint's
    every = {"hint": hint, MASK: batch[MASK]}  # every sample has one (no mask_present)
    assert torch.equal(pixel_mask(every, hint, 3), own.float() / 255)
    aux = MaskedRecon(1.0, 3)
    module = SimpleNamespace(control_key="hint")
    pred, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    base = aux(module, batch, None, None, None, pred, target)
    in_own, in_hint = pred.clone(), pred.clone()
    in_own[0, :, :, 5] += 1.0
    in_hint[0, :, 3, 2] += 1.0  # inside the hint's mask, outside sample 0's own
    assert not torch.equal(aux(module, batch, None, None, None, in_own, target), base)
    assert torch.equal(aux(module, batch, None, None, None, in_hint, target), base)


def test_the_mask_member_is_cropped_and_flipped_with_the_image():
    # 48x32 image: covering a 32 px square needs no resize, so the random crop and flip are exact pixels.
    image = np.zeros((32, 48, 3), np.uint8)
    image[4:20, 6:30] = 255
    image[22:28, 36:44] = 255
    mask = (image[:, :, 0] > 0).astype(np.uint8) * 255
    hint = np.zeros((32, 48), np.uint8)
    hint[16, :] = 255
    decoder = SampleDecoder(32, "jpg", "png", "txt", crop="random", hflip=0.5, mask_key="mask")
    flips, corners = set(), set()
    for i in range(12):
        sample = {"__key__": f"k{i}", "jpg": _png(image), "png": _png(hint), "txt": b"x", "mask.png": _png(mask)}
        out = decoder(sample)
        assert out[MASK].dtype == torch.uint8 and out[MASK].shape == (1, 32, 32)
        assert torch.equal(out[MASK][0], (out["image"][0] > 127).to(torch.uint8) * 255)
        left = int(out["crop_top_left"][1])
        unflipped = torch.from_numpy(mask[:, left : left + 32])
        flipped = torch.equal(out[MASK][0], unflipped.flip(-1))
        assert flipped or torch.equal(out[MASK][0], unflipped)
        flips.add(flipped)
        corners.add(left)
    assert flips == {True, False} and len(corners) > 3  # both geometries were drawn
    # A sample without the member has no mask; in a batch with one that has, it is marked absent.
    without = decoder({"__key__": "k0", "jpg": _png(image), "png": _png(hint), "txt": b"x"})
    assert MASK not in without
    batch = collate([out, without])
    assert batch[MASK_PRESENT].tolist() == [True, False] and batch[MASK][1].eq(0).all()
    assert MASK_PRESENT not in collate([out, out]) and MASK not in collate([without, without])
    # A mask of another size than the image is a bad sample, named.
    with pytest.raises(ValueError, match="mask"):
        decoder({"__key__": "k", "jpg": _png(image), "png": _png(hint), "txt": b"x", "mask.png": _png(mask[:, :40])})


def test_the_data_config_reads_the_member_that_aux_mask_key_names(tmp_path):
    cfg = compose_train(["controlnet.aux_loss=masked_recon", "controlnet.aux_mask_key=seg"])
    assert cfg.data.mask_key == "seg" and make_decoder(cfg.data, 3).mask_member == "seg.png"
    validate_train_config(cfg)
    cfg.data.mask_key = "mask"  # a mismatch is an error, naming both keys
    with pytest.raises(ConfigError, match=r"data.mask_key='mask'.*controlnet.aux_mask_key='seg'"):
        validate_train_config(cfg)


# -- runs and logging ------------------------------------------------------------------------------
def _metrics(run: Path) -> list[dict]:
    rows = []
    for path in sorted(run.glob("logs/version_*/metrics.csv")):
        rows += list(csv.DictReader(open(path)))
    return rows


def test_controlnet_train_with_edge_loss_finishes_and_logs_the_term(shapes_dir, tmp_path):
    run = tmp_path / "run"
    overrides = [
        f"run_dir={run}", f"data.shards={shapes_dir / 'train'}", "data.synthetic=null", "data.batch_size=4",
        "data.num_workers=0", "data.shuffle_buffer=16", "trainer.max_steps=2", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "checkpoint.every_n_steps=0",
        "validation.every_n_steps=0", "validation.num_samples=0", "logger=csv",
        "controlnet.aux_loss=edge_loss", "controlnet.aux_t_max=999",  # every sample: the term is never 0
    ]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "nemo_controlnet.cli.train", *overrides], cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in _metrics(run) if r.get("train/edge_loss")]
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert all(0 < float(r["train/edge_loss"]) < float(r["train/loss"]) for r in rows)


def test_masked_recon_trains_on_shards_with_mask_members(train_cfg, tmp_path, caplog):
    shards = tmp_path / "masked"
    shards.mkdir()
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(shards / "masked-000000.tar")) as sink:
        for i in range(8):
            image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
            hint, mask = np.zeros((64, 64), np.uint8), np.zeros((64, 64), np.uint8)
            hint[20:40, 30] = 255
            mask[8:24, 8:24] = 255
            sample = {"__key__": f"s{i}", "jpg": _png(image), "png": _png(hint), "txt": "a shape"}
            if i % 4 != 3:  # most samples bring a mask: every batch has one, some batches mix
                sample["mask.png"] = _png(mask)
            sink.write(sample)
    cfg = train_cfg(f"data.shards={shards}", "trainer.max_steps=2", "validation.num_samples=0",
                    "checkpoint.every_n_steps=0", "controlnet.aux_loss=masked_recon")  # fmt: skip
    with caplog.at_level("INFO", logger="nemo_controlnet.training.module"):
        trainer, module = train(cfg)
    assert trainer.global_step == 2
    assert "mask (4, 1, 64, 64) torch.float32" in caplog.text  # the loader's masks reached the step, normalized
    rows = [r for r in _metrics(Path(cfg.run_dir)) if r.get("train/masked_recon")]
    assert len(rows) == 2 and all(float(r["train/masked_recon"]) > 0 for r in rows)


# -- errors ----------------------------------------------------------------------------------------
def test_bad_values_name_their_key():
    def message(**values) -> str:
        with pytest.raises(ValueError) as err:
            make_aux_loss(OmegaConf.create({"aux_loss": "edge_loss", **values}))
        return str(err.value)

    assert "controlnet.aux_loss='edges'" in message(aux_loss="edges")
    assert "controlnet.aux_loss_weight=-0.5" in message(aux_loss_weight=-0.5)
    assert "controlnet.aux_t_max=-1" in message(aux_t_max=-1)
    assert "controlnet.aux_mask_dilate=1.5" in message(aux_loss="masked_recon", aux_mask_dilate=1.5)
    assert make_aux_loss(None) is None and make_aux_loss({"aux_loss": "none", "aux_loss_weight": -1}) is None

    # Before any model is built: the train config check, with the scheduler's range and the hint's channels.
    cfg = compose_train(["controlnet.aux_loss=edge_loss", "controlnet.aux_t_max=1000", "model.hint_channels=2",
                         "controlnet.aux_loss_weight=-1"])  # fmt: skip
    with pytest.raises(ConfigError) as err:
        validate_train_config(cfg)
    text = str(err.value)
    assert "controlnet.aux_t_max=1000" in text and "0..999" in text
    assert "model.hint_channels=2" in text and "controlnet.aux_loss_weight=-1" in text
    with pytest.raises(ConfigError, match="controlnet.aux_loss='edge'"):
        validate_train_config(compose_train(["controlnet.aux_loss=edge"]))

    # Where the config does not say (a scheduler from disk): the first step checks against the scheduler.
    module = SimpleNamespace(control_key="hint", noise_scheduler=SimpleNamespace(config=SimpleNamespace(
        num_train_timesteps=100)))  # fmt: skip
    aux = EdgeLoss(0.1, 150)
    with pytest.raises(ValueError, match=r"controlnet.aux_t_max=150.*0\.\.99"):
        aux(module, {"hint": torch.zeros(1, 3, 8, 8)}, None, None, torch.tensor([0]), None, None)
    with pytest.raises(ValueError, match="model.hint_channels=2"):
        EdgeLoss(0.1, 50)(module, {"hint": torch.zeros(1, 2, 8, 8)}, None, None, torch.tensor([0]), None, None)
