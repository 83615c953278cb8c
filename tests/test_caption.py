"""Captioning in controlnet-prep (caption.model=<dir>): a tiny random BLIP, built here and saved with its
processor, captions a folder through the command; modes, prefix/suffix, skips, the manifest's record,
resume and cancel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nemo_controlnet.config import ConfigError
from nemo_controlnet.prep.job import PrepJob, run_prep
from tests.test_prep import picture, prep_cfg, read_out, save

REPO = Path(__file__).resolve().parents[1]
MAX_NEW_TOKENS = 6
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]  # BLIP's tokenizer: BERT's, bos [DEC]


def tiny_blip(directory: Path, seed: int = 0, image_size: int = 32) -> Path:
    """A random BlipForConditionalGeneration (two ~32-wide layers) and its BlipProcessor (a BERT
    tokenizer over a vocab.txt written here), saved as a hub snapshot would be. Its weights are drawn
    wide enough (initializer_range 0.2) that captions differ from image to image."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor

    try:  # transformers 5 without torchvision: the PIL backend, named
        from transformers import BlipImageProcessorPil as BlipImageProcessor
    except ImportError:
        from transformers import BlipImageProcessor

    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(SPECIALS + ["a", "photography", "of"] + [f"w{i}" for i in range(200)]) + "\n")
    tokenizer = BertTokenizer(str(vocab), bos_token="[DEC]")
    ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in (("bos", "[DEC]"), ("sep", "[SEP]"), ("pad", "[PAD]"))}
    width, init = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}, 0.2
    config = BlipConfig(
        vision_config={**width, "image_size": image_size, "patch_size": 16, "num_hidden_layers": 1,
                       "initializer_range": init},
        text_config={**width, "vocab_size": len(tokenizer), "num_hidden_layers": 1, "max_position_embeddings": 64,
                     "bos_token_id": ids["bos"], "sep_token_id": ids["sep"], "eos_token_id": ids["sep"],
                     "pad_token_id": ids["pad"], "initializer_range": init},
        initializer_range=init,
    )  # fmt: skip
    torch.manual_seed(seed)
    BlipForConditionalGeneration(config).eval().save_pretrained(directory)
    size = {"height": image_size, "width": image_size}
    BlipProcessor(BlipImageProcessor(size=size), tokenizer).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def blip(tmp_path_factory) -> Path:
    return tiny_blip(tmp_path_factory.mktemp("tiny-blip"))


def reference_captions(model_dir: Path, paths: list[Path], prompt: str | None = None) -> dict[str, str]:
    """What the model generates for each image, asked one image at a time, straight through transformers."""
    import torch
    from transformers import BlipForConditionalGeneration, BlipProcessor

    model = BlipForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = BlipProcessor.from_pretrained(model_dir)
    out, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only wait on each other on a shared CPU
    try:
        for path in paths:
            inputs = processor(images=Image.open(path).convert("RGB"), return_tensors="pt",
                               **({"text": prompt} if prompt else {}))  # fmt: skip
            with torch.inference_mode():
                ids = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
            out[path.name] = " ".join(processor.batch_decode(ids, skip_special_tokens=True)[0].split())
    finally:
        torch.set_num_threads(threads)
    return out


def photos(root: Path, n: int, captions: dict[int, str] | None = None) -> list[Path]:
    paths = [save(root / f"{i:02d}.png", picture(i)) for i in range(n)]
    for i, text in (captions or {}).items():
        paths[i].with_suffix(".txt").write_text(text)
    return paths


def by_file(out: Path) -> dict[str, dict]:
    return {json.loads(s["json"])["relpath"]: s for s in read_out(out).values()}


def caption_args(model: Path, *more: str) -> list[str]:
    # On the CPU in fp32 also where a GPU is (auto would pick it, in bf16): the captions equal the reference's.
    return [f"caption.model={model}", f"caption.max_new_tokens={MAX_NEW_TOKENS}", "caption.device=cpu", *more]


def test_command_captions_a_folder_without_captions(tmp_path, blip):
    paths = photos(tmp_path / "photos", 10)
    out = tmp_path / "out"
    start = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "nemo_controlnet.cli.prep", "source=folder", f"source.root={tmp_path / 'photos'}",
         f"out_dir={out}", "shard_size=4", "workers=2", *caption_args(blip, "caption.mode=missing",
         "caption.batch_size=3", "caption.prefix='photo of '", "caption.suffix=', canny'")],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    expected = reference_captions(blip, paths)
    assert len(set(expected.values())) > 5, expected  # the captions depend on the image
    samples = by_file(out)
    assert sorted(samples) == sorted(expected)
    for name, sample in samples.items():
        assert sample["txt"].decode() == f"photo of {expected[name]}, canny", name
        assert expected[name] and json.loads(sample["json"])["caption_generated"] is True
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_samples"] == 10 and manifest["captioned"] == 10
    assert manifest["params"]["caption"] == {
        "model": str(blip), "model_type": "blip", "name_or_path": None,
        "architectures": ["BlipForConditionalGeneration"], "mode": "missing", "prefix": "photo of ",
        "suffix": ", canny", "separator": ", ", "prompt": None, "keep_prompt": False,
        "max_new_tokens": MAX_NEW_TOKENS, "num_beams": 1, "dtype": "fp32",
    }  # fmt: skip
    assert "captions" in result.stderr  # the progress bar's captions and captions/s
    print(f"command: 10 images captioned in {time.time() - start:.1f}s")


def test_modes_missing_overwrite_prefix(tmp_path, blip):
    """missing keeps a sample's caption and captions only those without one (an empty one counts as
    none); overwrite replaces every caption; prefix puts the generated one before the sample's own."""
    paths = photos(tmp_path / "photos", 5, {0: "a red square", 1: "   ", 3: "a blue square"})
    expected = reference_captions(blip, paths)
    root = f"source.root={tmp_path / 'photos'}"
    # three reader threads and batches of 2: the captions still reach their own samples
    outs = {}
    for mode in ("missing", "overwrite", "prefix"):
        outs[mode] = tmp_path / mode
        args = caption_args(blip, f"caption.mode={mode}", "caption.separator='. '",  # quoted: Hydra trims spaces
                            "caption.reader_threads=3", "caption.batch_size=2")  # fmt: skip
        summary = run_prep(prep_cfg(root, f"out_dir={outs[mode]}", *args))
        assert summary["written"] == 5 and summary["skipped"] == {}
        assert summary["captioned"] == {"missing": 3, "overwrite": 5, "prefix": 5}[mode]
    txt = {mode: {name: s["txt"].decode() for name, s in by_file(out).items()} for mode, out in outs.items()}
    gen = {p.name: expected[p.name] for p in paths}
    assert txt["missing"] == {**gen, "00.png": "a red square", "03.png": "a blue square"}
    assert txt["overwrite"] == gen
    assert txt["prefix"] == {**gen, "00.png": f"{gen['00.png']}. a red square",
                             "03.png": f"{gen['03.png']}. a blue square"}  # fmt: skip
    kept = json.loads(by_file(outs["missing"])["00.png"]["json"])
    assert "caption_generated" not in kept


def test_prompt_is_given_to_the_model_and_its_echo_dropped(tmp_path, blip):
    paths = photos(tmp_path / "photos", 3)
    expected = reference_captions(blip, paths, prompt="a photography of")
    assert all(text.startswith("a photography of ") for text in expected.values())  # BLIP continues it
    for keep in (False, True):
        out = tmp_path / f"keep-{keep}"
        run_prep(prep_cfg(f"source.root={tmp_path / 'photos'}", f"out_dir={out}", *caption_args(
            blip, "caption.prompt='a photography of'", f"caption.keep_prompt={keep}")))  # fmt: skip
        got = {name: s["txt"].decode() for name, s in by_file(out).items()}
        assert got == {k: v if keep else v[len("a photography of ") :] for k, v in expected.items()}


def test_bad_images_and_model_errors_are_counted_skips(tmp_path, blip):
    paths = photos(tmp_path / "photos", 4)
    (tmp_path / "photos" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    summary = run_prep(prep_cfg(f"source.root={tmp_path / 'photos'}", f"out_dir={tmp_path / 'out'}",
                                *caption_args(blip, "caption.batch_size=2")))  # fmt: skip
    assert summary["written"] == 4 and summary["skipped"] == {"corrupt_image": 1} and summary["captioned"] == 4
    expected = reference_captions(blip, paths)
    assert {n: s["txt"].decode() for n, s in by_file(tmp_path / "out").items()} == expected

    # A model error on an image (here on every one: more tokens than the model has positions) costs that
    # image, counted by reason: the job ends normally, its manifest complete.
    args = [f"caption.model={blip}", "caption.device=cpu", "caption.max_new_tokens=80", "caption.batch_size=4"]
    summary = run_prep(prep_cfg(f"source.root={tmp_path / 'photos'}", f"out_dir={tmp_path / 'fail'}", *args))
    assert summary["written"] == 0 and summary["captioned"] == 0 and summary["complete"]
    assert summary["skipped"] == {"caption_failed": 4, "corrupt_image": 1}
    stats = json.loads(next((tmp_path / "fail" / ".prep").glob("*.tar.json")).read_text())
    assert {reason for _, reason, _ in stats["skipped_files"]} == {"caption_failed", "corrupt_image"}
    assert any("IndexError" in detail for _, reason, detail in stats["skipped_files"] if reason == "caption_failed")


def test_bad_caption_model_fails_in_seconds_naming_the_key(tmp_path):
    photos(tmp_path / "photos", 1)
    args = [f"source.root={tmp_path / 'photos'}", f"out_dir={tmp_path / 'out'}"]
    with pytest.raises(ConfigError, match=r"caption\.model=.*no such file or directory"):
        PrepJob(prep_cfg(*args, f"caption.model={tmp_path / 'nowhere'}"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"caption\.model=.*no config\.json"):
        PrepJob(prep_cfg(*args, f"caption.model={tmp_path / 'empty'}"))
    with pytest.raises(ConfigError, match=r"caption\.mode='sometimes'"):
        PrepJob(prep_cfg(*args, f"caption.model={tmp_path / 'empty'}", "caption.mode=sometimes"))

    from transformers import BertConfig, BertModel  # a text model: no image-to-text class takes it

    BertModel(BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                         intermediate_size=8)).save_pretrained(tmp_path / "bert")  # fmt: skip
    start = time.time()
    with pytest.raises(ConfigError, match=r"caption\.model=.*'bert' is not an image-to-text model"):
        PrepJob(prep_cfg(*args, f"caption.model={tmp_path / 'bert'}")).run()
    assert time.time() - start < 20 and not (tmp_path / "out" / "manifest.json").exists()

    # The command says it in one line, without a traceback.
    command = [sys.executable, "-m", "nemo_controlnet.cli.prep", *args, f"caption.model={tmp_path / 'nowhere'}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "caption.model=" in result.stderr and "Traceback" not in result.stderr


def test_resume_refuses_another_captioner_and_no_caption_model_changes_nothing(tmp_path, blip):
    photos(tmp_path / "photos", 3)
    args = [f"source.root={tmp_path / 'photos'}", f"out_dir={tmp_path / 'out'}", "source.caption=a photo"]
    run_prep(prep_cfg(*args, *caption_args(blip, "caption.mode=overwrite")))
    again = run_prep(prep_cfg(*args, *caption_args(blip, "caption.mode=overwrite")))  # complete: nothing to do
    assert again["written"] == 0 and again["captioned"] == 0 and again["complete"]
    with pytest.raises(ValueError, match="differing: caption"):
        run_prep(prep_cfg(*args, *caption_args(blip, "caption.mode=overwrite", "caption.suffix=x")))
    with pytest.raises(ValueError, match="differing: caption"):
        run_prep(prep_cfg(*args))  # captioned output, uncaptioned run
    summary = run_prep(prep_cfg(*args, "overwrite=true"))
    assert summary["written"] == 3 and "captioned" not in summary
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert "caption" not in manifest["params"] and "captioned" not in manifest
    assert {s["txt"] for s in read_out(tmp_path / "out").values()} == {b"a photo"}


@pytest.mark.parametrize("workers", [1, 2])
def test_cancel_while_captioning_then_resume(tmp_path, blip, workers):
    paths = photos(tmp_path / "photos", 6)
    args = [f"source.root={tmp_path / 'photos'}", f"out_dir={tmp_path / 'out'}", "shard_size=2", f"workers={workers}",
            *caption_args(blip, "caption.batch_size=1")]  # fmt: skip
    seen = []

    def progress(p):
        seen.append(p)
        if p.captioned >= 3:
            job.cancel()

    job = PrepJob(prep_cfg(*args), progress)
    summary = job.run()
    assert summary["cancelled"] and 0 < summary["captioned"] < 6 and not summary["complete"]
    assert max(p.captioned for p in seen) == summary["captioned"] and seen[-1].caption_rate > 0
    resumed = run_prep(prep_cfg(*args))
    # (a worker may have finished a shard the cancelled run did not wait to count)
    assert resumed["complete"] and 0 < resumed["written"] <= 6 - summary["written"]
    expected = reference_captions(blip, paths)
    assert {n: s["txt"].decode() for n, s in by_file(tmp_path / "out").items()} == expected


def test_bench_script_reports_captions_per_second(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_caption", REPO / "scripts" / "bench_caption.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--images", "8", "--batch-sizes", "4", "--dir", str(tmp_path)])
    assert [r["batch_size"] for r in result] == [4] and all(r["captions_per_s"] > 0 for r in result)
    assert "caption.model=/models/blip-image-captioning-large" in capsys.readouterr().out


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_captions_on_the_gpu_in_bf16(tmp_path, blip):
    """device=auto and dtype=auto on a GPU machine: CUDA, bf16; recorded in the manifest."""
    photos(tmp_path / "photos", 8)
    summary = run_prep(prep_cfg(f"source.root={tmp_path / 'photos'}", f"out_dir={tmp_path / 'out'}", "workers=2",
                                f"caption.model={blip}", f"caption.max_new_tokens={MAX_NEW_TOKENS}",
                                "caption.batch_size=4"))  # fmt: skip
    assert summary["written"] == 8 and summary["captioned"] == 8
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["params"]["caption"]["dtype"] == "bf16"
    assert all(s["txt"].strip() for s in read_out(tmp_path / "out").values())


def test_the_writer_decodes_what_the_captioner_decoded(tmp_path, blip):
    """A 16-bit PNG and a palette image: the captioner sees the same RGB pixels the shards get."""
    root = tmp_path / "photos"
    root.mkdir()
    Image.fromarray((picture(3).astype(np.uint16) * 257)[..., 0]).save(root / "a.png")  # I;16
    Image.fromarray(picture(2)).convert("P").save(root / "b.png")
    run_prep(prep_cfg(f"source.root={root}", f"out_dir={tmp_path / 'out'}", *caption_args(blip)))
    from nemo_controlnet.data.decode import load_image

    samples = by_file(tmp_path / "out")
    assert sorted(samples) == ["a.png", "b.png"]
    for name, sample in samples.items():
        image, converted = load_image((root / name).read_bytes(), "image")
        assert converted  # converted, as the writer records
        image.save(tmp_path / name)
        assert sample["txt"].decode() == reference_captions(blip, [tmp_path / name])[name]
