"""Controllability metrics: each scores what it claims on images whose answer is known."""

import os

import numpy as np
import pytest

from nemo_controlnet.prep.synthetic import circle_params, render
from nemo_controlnet.eval.metrics import (
    canny_edges,
    edge_f1,
    hint_edges,
    mean_metrics,
    sample_metrics,
    shape_metrics,
)


def test_edge_f1_counts_edge_pixels_exactly_and_with_tolerance():
    target = np.zeros((16, 16), bool)
    target[4, 2:12] = True  # 10 pixels
    assert edge_f1(target, target)["f1"] == 1.0
    shifted = np.roll(target, 1, axis=0)
    assert edge_f1(shifted, target)["f1"] == 0.0  # exact matching: a one-pixel shift misses everything
    assert edge_f1(shifted, target, tolerance=1)["f1"] == 1.0
    half = target.copy()
    half[4, 7:12] = False  # 5 of 10 found, none spurious
    scores = edge_f1(half, target)
    assert scores["precision"] == 1.0 and scores["recall"] == 0.5 and scores["f1"] == pytest.approx(2 / 3)
    assert edge_f1(np.zeros_like(target), target)["f1"] == 0.0
    assert edge_f1(np.zeros_like(target), np.zeros_like(target))["f1"] == 1.0


def test_a_perfect_shapes_image_scores_perfectly_and_a_misplaced_one_does_not():
    params = circle_params(seed=3, index=7, resolution=64)
    image, hint, _ = render(params)
    perfect = sample_metrics(image, hint, params)
    assert perfect["iou"] > 0.97 and perfect["circle_color_error"] < 0.03 and perfect["background_color_error"] < 0.01
    assert perfect["edge_f1_tol1"] > 0.8  # Canny of the rendered disk lies on the drawn outline
    assert perfect["ms_ssim"] is None and 0 < perfect["ssim"] <= 1  # too small for five MS-SSIM scales

    moved = dict(params, cx=params["radius"], cy=params["radius"])  # the same circle, somewhere else
    if (moved["cx"], moved["cy"]) == (params["cx"], params["cy"]):
        moved = dict(params, cx=64 - params["radius"], cy=64 - params["radius"])
    elsewhere, _, _ = render(moved)
    wrong = sample_metrics(elsewhere, hint, params)
    assert wrong["iou"] < perfect["iou"] - 0.3 and wrong["edge_f1_tol1"] < perfect["edge_f1_tol1"] - 0.3
    assert wrong["ssim"] < perfect["ssim"]

    # colours swapped: the right place, the wrong colours
    swapped = dict(params, circle_rgb=params["background_rgb"], background_rgb=params["circle_rgb"])
    inverted, _, _ = render(swapped)
    colours = shape_metrics(inverted, params)
    assert colours["circle_color_error"] > 0.1 and colours["iou"] < 0.5


def test_edges_of_a_flat_image_are_empty_and_hint_edges_are_its_lines():
    assert not canny_edges(np.full((32, 32, 3), 90, np.uint8)).any()
    hint = np.zeros((8, 8, 3), np.uint8)
    hint[2, :] = 255
    assert hint_edges(hint).sum() == 8 and hint_edges(hint[:, :, 0]).sum() == 8


def test_means_skip_metrics_a_sample_does_not_have():
    assert mean_metrics([{"a": 1.0, "b": None}, {"a": 3.0, "b": 2.0}]) == {"a": 2.0, "b": 2.0}


def test_controlnet_eval_scores_control_against_the_same_base_without_it(train_cfg, shapes_dir, tmp_path):
    """The command end to end on a tiny run: metrics.json, grid and model card; the baseline
    (control_scale 0) is the base alone: it does not change when the ControlNet does."""
    import json
    import shutil
    import subprocess
    import sys

    from PIL import Image

    from nemo_controlnet.models.formats import read_metadata
    from nemo_controlnet.training.run import train

    cfg = train_cfg("trainer.max_steps=2", "validation.num_samples=2", "optim.lr=1e-2")
    train(cfg)
    run = tmp_path / "run"
    args = [sys.executable, "-m", "nemo_controlnet.cli.eval", f"shards={shapes_dir / 'val'}", "num_samples=3",
            "num_inference_steps=2", "batch_size=2", "device=cpu"]  # fmt: skip

    def evaluate(controlnet, out):
        proc = subprocess.run([*args, f"controlnet={controlnet}", f"out_dir={out}"], cwd=tmp_path, capture_output=True,
                              text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout, json.loads((out / "metrics.json").read_text())

    stdout, report = evaluate(run, tmp_path / "eval")
    assert set(report["results"]) == {"controlled", "uncontrolled"} and report["num_samples"] == 3
    for scores in report["results"].values():
        assert {"edge_f1", "edge_f1_tol1", "ssim", "iou", "circle_color_error"} <= set(scores)
        assert all(0 <= scores[k] <= 1 for k in ("edge_f1", "iou", "circle_color_error"))
    assert "uncontrolled" in stdout and "edge_f1" in stdout  # the table
    assert len(report["per_sample"]) == 3 and report["per_sample"][0]["key"] == "00000000"
    assert Image.open(tmp_path / "eval" / "grid.png").size == (3 * 64, 3 * 64)  # hint | controlled | uncontrolled
    card = (run / "controlnet" / "README.md").read_text()
    assert "control off" in card and read_metadata(run / "controlnet")["eval"]["num_samples"] == 3
    assert "| validation edge_f1 (step 2) |" in card and "validation.png" in card  # the final validation

    # Another ControlNet over the same base (its weights scaled): the baseline does not move, control does.
    other = tmp_path / "other"
    shutil.copytree(run / "controlnet", other)
    from diffusers import ControlNetModel

    net = ControlNetModel.from_pretrained(other)
    for name, p in net.named_parameters():
        if "controlnet_down_blocks" in name or "controlnet_mid_block" in name:
            p.data.normal_(0, 0.5)  # zero convs that are no longer zero: strong residuals
    net.save_pretrained(other)
    (other / "SHA256SUMS").unlink()  # changed on purpose: the export's checksums no longer apply
    from hydra import compose, initialize_config_module

    from nemo_controlnet.eval.evaluate import evaluate as evaluate_in_process

    with initialize_config_module(config_module="nemo_controlnet.conf", version_base="1.3"):
        overrides = [a for a in args[3:]] + [f"controlnet={other}", f"out_dir={tmp_path / 'eval2'}"]
        report2 = evaluate_in_process(compose(config_name="eval", overrides=overrides))
    assert report2["results"]["uncontrolled"] == report["results"]["uncontrolled"]
    assert report2["results"]["controlled"] != report["results"]["controlled"]


def test_validation_samples_by_key_in_order_with_their_ground_truth(shapes_dir):
    from omegaconf import OmegaConf

    from nemo_controlnet.data.datamodule import validation_samples
    from tests.conftest import compose_train

    cfg = compose_train([f"validation.shards={shapes_dir / 'val'}", "data.synthetic=null"])
    cfg.validation.keys = ["00000003", "00000001"]
    prompts, hints, metas = validation_samples(cfg.validation, cfg.data, 3)
    assert [m["circle_color"] in p for p, m in zip(prompts, metas, strict=True)] == [True, True]
    assert hints.shape == (2, 3, 64, 64) and [m["cx"] for m in metas] != []
    first = validation_samples(OmegaConf.merge(cfg.validation, {"keys": None, "num_samples": 4}), cfg.data, 3)
    assert prompts == [first[0][3], first[0][1]] and metas == [first[2][3], first[2][1]]
    cfg.validation.keys = ["00000003", "nope"]
    with pytest.raises(KeyError, match="nope"):
        validation_samples(cfg.validation, cfg.data, 3)
