"""`moonbase video`: a rendered MP4 of moving shapes (PyAV), sampled every 0.25 s; nano's boxes follow the
known trajectory, and the annotated video decodes with every frame."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image, ImageDraw

from moonbase.cli import main
from moonbase.data.shapes import COLORS
from moonbase.jobs.video import Sampling, Stats, run_video, sample_frames
from moonbase.metrics import iou

FPS, SECONDS, SIZE = 12, 2, 256
DIAMETER = 0.22


def circle_box(t: float) -> tuple[float, float, float, float]:
    """The red circle moves left to right and a little down."""
    cx, cy = 0.2 + 0.3 * t, 0.3 + 0.1 * t
    return cx - DIAMETER / 2, cy - DIAMETER / 2, cx + DIAMETER / 2, cy + DIAMETER / 2


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("video") / "shapes.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        for i in range(FPS * SECONDS):
            im = Image.new("RGB", (SIZE, SIZE), (225, 225, 222))
            d = ImageDraw.Draw(im)
            d.ellipse([v * SIZE for v in circle_box(i / FPS)], fill=COLORS["red"])
            d.rectangle([0.65 * SIZE, 0.7 * SIZE, 0.85 * SIZE, 0.9 * SIZE], fill=COLORS["blue"])  # still
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(im), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def test_sampling_every_fps_and_keyframes(clip):
    assert [round(f.t, 3) for f in sample_frames(str(clip), Sampling(every=0.5))] == [0.0, 0.5, 1.0, 1.5]
    assert len(list(sample_frames(str(clip), Sampling(fps=4)))) == 8
    keys = list(sample_frames(str(clip), Sampling(keyframes=True)))
    assert keys and keys[0].index == 0 and len(keys) < FPS * SECONDS


def test_video_timeline_follows_the_circle_and_the_drawing_has_every_frame(clip, tmp_path, capsys):
    timeline, drawn, summary = tmp_path / "t.jsonl", tmp_path / "drawn.mp4", tmp_path / "summary.json"
    argv = ["video", str(clip), "--every", "0.25s", "--detect", "circle", "--query", "What color is the circle?"]
    assert main(argv + ["-o", str(timeline), "--draw", str(drawn), "--summary", str(summary), "--model", "nano"]) == 0
    rows = [json.loads(line) for line in timeline.read_text().splitlines()]
    times = [r["t"] for r in rows if r["task"] == "detect:circle"]
    assert times == [0.25 * k for k in range(4 * SECONDS)]  # in order, one per sampled frame
    assert [r["frame"] for r in rows if r["task"] == "detect:circle"] == [3 * k for k in range(4 * SECONDS)]
    boxes = [r["result"]["objects"] for r in rows if r["task"] == "detect:circle"]
    hits = [len(b) == 1 and iou(tuple(b[0].values()), circle_box(t)) >= 0.5 for b, t in zip(boxes, times, strict=True)]
    assert sum(hits) >= 0.75 * len(hits), boxes
    answers = [r["result"]["answer"] for r in rows if r["task"].startswith("query:")]
    assert answers.count("red") >= 0.75 * len(answers), answers
    s = json.loads(summary.read_text())
    assert s["frames"] == 4 * SECONDS and s["dropped"] == 0 and s["drawn_frames"] == FPS * SECONDS
    assert s["tasks"]["detect:circle"]["first_t"] <= 0.25 and s["tasks"]["detect:circle"]["last_t"] >= 1.5
    with av.open(str(drawn)) as video:
        frames = [f.to_ndarray(format="rgb24") for f in video.decode(video=0)]
    assert len(frames) == FPS * SECONDS and frames[0].shape == (SIZE, SIZE, 3)
    r, g, b = (np.stack(frames)[..., c].astype(int) for c in range(3))
    magenta = ((r > 150) & (b > 150) & (g < 120)).sum(axis=(1, 2))  # the boxes' colour, after the encoder's blur
    assert (magenta > 100).mean() >= 0.75, magenta


def test_a_slow_consumer_of_a_live_source_drops_frames_and_counts_them(clip, monkeypatch):
    import moonbase
    from moonbase.jobs import video

    monkeypatch.setattr(video, "is_live", lambda source: True)  # the file read as fast as a camera would send it
    vl, stats = moonbase.vl("nano"), Stats()
    tasks = (moonbase.SkillRequest("caption", None, length="long"),)
    rows = list(run_video(vl, str(clip), tasks, Sampling(fps=FPS), concurrency=1, progress=False, stats=stats))
    assert stats.dropped > 0 and stats.sampled == len(rows) == FPS * SECONDS - stats.dropped


def test_bad_video_input_gets_a_clear_error(tmp_path, capsys):
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    assert main(["video", str(tmp_path / "bad.mp4"), "--detect", "x", "--model", "nano"]) == 2
    assert "cannot open video" in capsys.readouterr().err
    assert main(["video", str(tmp_path / "bad.mp4"), "--model", "nano"]) == 2  # no task


def test_the_python_api_yields_the_same_timeline(clip):
    import moonbase

    detect = moonbase.SkillRequest("detect", None, object="circle")
    rows = list(moonbase.vl("nano").video(str(clip), [detect], every=0.5))
    assert [(r["t"], r["frame"], r["task"]) for r in rows] == [(0.5 * k, 6 * k, "detect:circle") for k in range(4)]
    assert all(len(r["result"]["objects"]) == 1 for r in rows)
