"""The prep job object that the command and a UI drive: progress reports, cancel from another thread
(only complete shards remain, the manifest lists exactly them), resume to the uninterrupted result."""

import json
import threading
import time

import pytest

from nemo_controlnet.data.hints import Canny
from nemo_controlnet.prep.job import PrepJob
from tests.test_prep import picture, prep_cfg, read_out, save


class SlowCanny(Canny):
    """Canny at a pace a cancel can land in the middle of."""

    def __call__(self, image, conditioning=None, rng=None):
        time.sleep(0.05)
        return super().__call__(image, conditioning, rng)


def photos(root, n):
    for i in range(n):
        save(root / f"{i:02d}.jpg", picture(i)).with_suffix(".txt").write_text(f"photo {i}")
    return root


def run_in_thread(job):
    result = {}
    thread = threading.Thread(target=lambda: result.update(summary=job.run()))
    thread.start()
    return thread, result


def test_progress_reports_every_shard_with_totals_and_rate(tmp_path):
    root = photos(tmp_path / "photos", 12)
    seen = []
    summary = PrepJob(prep_cfg(f"source.root={root}", f"out_dir={tmp_path / 'out'}", "shard_size=2"),
                      seen.append).run()  # fmt: skip
    assert summary["written"] == 12 and not summary["cancelled"]
    assert [p.units_done for p in seen] == list(range(7))  # the start, then one per shard
    assert {p.units_total for p in seen} == {6} and {p.samples_total for p in seen} == {12}
    assert [p.samples_done for p in seen] == [0, 2, 4, 6, 8, 10, 12]
    assert seen[-1].written == 12 and seen[-1].eta == 0 and seen[-1].rate > 0


@pytest.mark.parametrize("workers", [1, 2])
def test_cancel_keeps_only_complete_shards_and_resume_matches_an_uninterrupted_run(tmp_path, workers):
    root = photos(tmp_path / "photos", 16)
    args = [f"source.root={root}", "shard_size=2", f"workers={workers}", "hint._target_=tests.test_prep_job.SlowCanny"]
    full = read_out(tmp_path / "full") if PrepJob(prep_cfg(*args, f"out_dir={tmp_path / 'full'}")).run() else None

    out = tmp_path / "out"
    first_shard = threading.Event()
    job = PrepJob(prep_cfg(*args, f"out_dir={out}"), lambda p: p.units_done and first_shard.set())
    thread, result = run_in_thread(job)
    assert first_shard.wait(60)
    asked = time.monotonic()
    job.cancel()
    thread.join(30)
    assert not thread.is_alive() and time.monotonic() - asked < 5  # stops within seconds
    summary = result["summary"]
    assert summary["cancelled"] and not summary["complete"]
    manifest = json.loads((out / "manifest.json").read_text())
    listed = [s["name"] for s in manifest["shards"]]
    complete = sorted(p.name for p in out.glob("data-*.tar") if (out / ".prep" / f"{p.name}.json").is_file())
    assert 1 <= len(listed) < 8 and listed == complete  # the manifest lists exactly the complete shards
    assert manifest["num_samples"] == 2 * len(listed) and not manifest["complete"]
    if workers == 1:  # in-process, the shard being written is dropped at once (a worker's temp file waits
        # for the next run's sweep, a tar renamed just before the terminate for its rewrite)
        assert not [p for p in out.iterdir() if ".tmp-" in p.name]
        assert sorted(p.name for p in out.glob("data-*.tar")) == complete

    resumed = PrepJob(prep_cfg(*args, f"out_dir={out}")).run()
    assert resumed["complete"] and resumed["written"] == 16 - 2 * len(listed)
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    again = read_out(out)
    assert sorted(again) == sorted(full)
    assert all(again[k][m] == full[k][m] for k in full for m in ("jpg", "png", "txt"))


def test_cancelled_precompute_resumes_with_the_missing_hints(tmp_path):
    root = photos(tmp_path / "photos", 8)
    args = ["mode=precompute", f"source.root={root}", "hint._target_=tests.test_prep_job.SlowCanny"]
    job = PrepJob(prep_cfg(*args), lambda p: p.units_done >= 3 and job.cancel())
    summary = job.run()
    assert summary["cancelled"] and summary["written"] == 3 == summary["num_hints"]
    resumed = PrepJob(prep_cfg(*args)).run()
    assert resumed["present"] == 3 and resumed["written"] == 5 and resumed["num_hints"] == 8


def test_an_output_begun_before_prep_moved_out_of_data_resumes(tmp_path):
    root = photos(tmp_path / "photos", 4)
    args = [f"source.root={root}", f"out_dir={tmp_path / 'out'}", "shard_size=2"]
    PrepJob(prep_cfg(*args)).run()
    params_path = tmp_path / "out" / ".prep" / "params.json"
    params = json.loads(params_path.read_text())
    assert params["source"]["_target_"] == "nemo_controlnet.prep.sources.ImageFolder"
    params["source"]["_target_"] = "nemo_controlnet.data.sources.ImageFolder"  # as written before the move
    params_path.write_text(json.dumps(params))
    assert PrepJob(prep_cfg(*args)).run()["complete"]
    with pytest.raises(ValueError, match="mode='bogus'"):
        PrepJob(prep_cfg(*args, "mode=bogus"))


def test_a_cancelled_encode_keeps_no_partial_shard_and_resumes(tmp_path):
    from tests.test_encode import write_wide_shards

    inp = write_wide_shards(tmp_path / "in", num_shards=2, per_shard=5)
    args = ["mode=encode", "model=tiny", f"encode.input={inp}", f"out_dir={tmp_path / 'out'}", "resolution=64",
            "encode.batch_size=2"]  # fmt: skip
    job = PrepJob(prep_cfg(*args), lambda p: job.cancel())  # at once: inside the first shard, before a batch
    summary = job.run()
    assert summary["cancelled"] and summary["written"] == 0 and not summary["complete"]
    out = tmp_path / "out"
    assert not list(out.glob("*.tar")) and not [p for p in out.iterdir() if ".tmp-" in p.name]
    resumed = PrepJob(prep_cfg(*args)).run()
    assert resumed["complete"] and resumed["written"] == 10 and not resumed["cancelled"]


def test_cancel_after_two_shards_then_resume_lists_every_sample_once(tmp_path):
    root = photos(tmp_path / "photos", 40)
    out = tmp_path / "out"
    args = [f"source.root={root}", f"out_dir={out}", "shard_size=5", "workers=1",
            "hint._target_=tests.test_prep_job.SlowCanny"]  # fmt: skip
    asked = []

    def cancel_after_two(p):
        if p.units_done == 2 and not asked:
            asked.append(time.monotonic())
            job.cancel()

    job = PrepJob(prep_cfg(*args), cancel_after_two)
    summary = job.run()
    assert summary["cancelled"] and not summary["complete"] and summary["written"] == 10
    assert time.monotonic() - asked[0] < 5  # stops within seconds
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == ["data-000000.tar", "data-000001.tar"]
    assert sorted(p.name for p in out.glob("*.tar")) == ["data-000000.tar", "data-000001.tar"]  # no partial one

    resumed = PrepJob(prep_cfg(*args)).run()
    assert resumed["complete"] and resumed["written"] == 30
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == [f"data-{i:06d}.tar" for i in range(8)]
    samples = read_out(out)  # fails on a key seen twice
    assert sorted(samples) == [f"{i:09d}" for i in range(40)] and manifest["num_samples"] == 40
    assert sorted(s["txt"] for s in samples.values()) == sorted(f"photo {i}".encode() for i in range(40))
