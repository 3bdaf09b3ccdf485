"""Builds on Apache Beam (data_pipelines/engine.py): the DirectRunner with two worker
processes writes the same records as the single-process build of the same folder, bad files
are counted in the build's metrics on both engines, and the recaptioner is applied in the
workers and stored. (The latent cache's Beam build is in tests/test_latents.py, beside its VAE.)
"""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data_pipelines.build import build
from data_pipelines.video_folder import VideoFolder
from tests.conftest import write_ramp_mp4

BEAM_PROCESSES = (
    "--runner=DirectRunner --direct_num_workers=2 --direct_running_mode=multi_processing"
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Six clips and photos (more than one work unit), two corrupt files, one empty."""
    root = tmp_path_factory.mktemp("media")
    (root / "sub").mkdir()
    for i in range(3):
        write_ramp_mp4(root / f"clip_{i}.mp4", 3 + i, 16, 24, phase=10 * i)
    for i in range(3):
        image = np.random.default_rng(i).integers(0, 256, (12, 20, 3), np.uint8)
        Image.fromarray(image).save(root / "sub" / f"photo_{i}.png")
    (root / "bad_0.mp4").write_bytes(np.random.default_rng(0).bytes(2000))
    (root / "bad_1.png").write_bytes(b"not a png")
    (root / "empty.mov").write_bytes(b"")
    (root / "captions.jsonl").write_text(
        json.dumps(
            {"file": "clip_0.mp4", "caption": "a red circle moving left on a blue background"}
        )
        + "\n"
    )
    return str(root)


def records(data_dir: str) -> list[dict]:
    src = tfds.data_source("video_folder", split="train", data_dir=data_dir)
    return src, [src[i] for i in range(len(src))]


@pytest.fixture(scope="module")
def builds(folder, tmp_path_factory):
    """The folder built here and on Beam (bad files dropped), and here keeping them."""
    out, files_per_unit = {}, VideoFolder.FILES_PER_UNIT
    VideoFolder.FILES_PER_UNIT = 4  # several units, so both workers get some
    for name, beam, drop in [
        ("here", None, True),
        ("beam", BEAM_PROCESSES, True),
        ("kept", None, False),
    ]:
        data_dir = str(tmp_path_factory.mktemp(name))
        build(
            "video_folder",
            data_dir,
            folder=folder,
            drop_bad_media=drop,
            recaptioner="template",
            beam_options=beam,
            num_shards=2,
        )
        out[name] = data_dir
    VideoFolder.FILES_PER_UNIT = files_per_unit
    return out


def test_the_beam_build_writes_the_same_records_as_the_single_process_build(builds):
    here_src, here = records(builds["here"])
    beam_src, beam = records(builds["beam"])
    assert len(here) == len(beam) == 6
    for a, b in zip(here, beam, strict=True):
        assert sorted(a) == sorted(b)
        for key in a:
            assert a[key] == b[key] if isinstance(a[key], bytes) else np.array_equal(a[key], b[key])
    assert len(here_src.dataset_info.splits["train"].shard_lengths) == 2  # --num_shards


def test_bad_files_are_counted_on_both_engines_and_never_stop_the_build(builds, folder):
    for name in ("here", "beam"):
        src, kept = records(builds[name])
        counts = src.dataset_info.metadata["counts"]["train"]
        assert counts == {"undecodable": 3, "written": 6}, (name, counts)
        assert not any(b"bad_" in r["path"] or b"empty" in r["path"] for r in kept)
    # Kept (the default): stored and counted, for the input pipeline to skip as it reads.
    src, kept = records(builds["kept"])
    assert src.dataset_info.metadata["counts"]["train"] == {"undecodable": 3, "written": 9}
    assert len(kept) == 9


def test_the_recaptioner_runs_in_the_workers_and_its_identity_is_stored(builds):
    for name in ("here", "beam"):
        src, rows = records(builds[name])
        assert src.dataset_info.metadata["recaptioner"] == {"name": "template", "version": ""}
        captions = {r["path"].decode().rsplit("/", 1)[1]: r["caption"].decode() for r in rows}
        assert captions["clip_0.mp4"] == (
            "a video of a red circle that moves left across a plain blue background"
        )
        assert captions["photo_0.png"] == "photo 0"  # not in the synthetic grammar: kept


def test_a_rebuild_with_another_recaptioner_is_refused(builds, folder):
    with pytest.raises(ValueError, match="built with recaptioner.*template.*--overwrite"):
        build("video_folder", builds["kept"], folder=folder, recaptioner="identity")
