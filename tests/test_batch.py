"""`moonbase batch`: every image and task becomes one row (bad images become error rows), the output is
resumable after a kill -9, and every input format reads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moonbase.cli import main
from moonbase.data.shapes import render_scene
from moonbase.jobs import Journal, batch, parse_tasks, read_inputs

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 64
BROKEN = {"broken.png": b"not an image", "empty.jpg": b"", "truncated.png": None}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """64 synthetic scenes and 3 broken files (garbage, empty, a PNG cut in half)."""
    root = tmp_path_factory.mktemp("images")
    for i in range(N_IMAGES):
        render_scene(i, max_objects=4).image.save(root / f"scene{i:03d}.png")
    whole = (root / "scene000.png").read_bytes()
    for name, data in BROKEN.items():
        (root / name).write_bytes(whole[: len(whole) // 2] if data is None else data)
    return root


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def clean_run(folder, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("clean") / "out.jsonl"
    assert main(["batch", str(folder), "--caption", "short", "--detect", "circle", "-o", str(out), "--model", "nano"]) == 0
    return _rows(out)


def test_every_image_and_task_gets_one_row(folder, clean_run):
    keys = [(r["image"], r["task"]) for r in clean_run]
    assert len(keys) == len(set(keys)) == (N_IMAGES + len(BROKEN)) * 2
    for row in clean_run:
        name = Path(row["image"]).name
        if name in BROKEN:
            assert row["error"]["type"] == "ImageError" and row["error"]["message"] and "result" not in row
        elif row["task"] == "caption:short":
            assert isinstance(row["result"]["caption"], str) and row["result"]["caption"]
        else:
            assert row["task"] == "detect:circle" and isinstance(row["result"]["objects"], list)
    # nano finds the circles: a scene with a circle mostly gets a box, a scene without mostly none
    circles = {
        f"scene{i:03d}.png": any(s.kind == "circle" for s in render_scene(i, max_objects=4).shapes) for i in range(N_IMAGES)
    }
    found = {
        Path(r["image"]).name: bool(r["result"]["objects"]) for r in clean_run if r["task"] == "detect:circle" and "result" in r
    }
    assert sum(found[k] == v for k, v in circles.items()) >= 0.85 * N_IMAGES


def test_a_job_killed_mid_run_resumes_without_losing_or_repeating_a_row(folder, clean_run, tmp_path):
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "moonbase", "batch", str(folder), "--caption", "short", "--detect", "circle"]
    cmd += ["-o", str(out), "--model", "nano", "--concurrency", "4"]
    env = os.environ | {"PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(out.read_bytes().splitlines()) < 20):
        assert proc.poll() is None, "the job ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = out.read_bytes()
    assert 20 <= partial.count(b"\n") < len(clean_run)
    with open(out, "ab") as f:
        f.write(b'{"image": "torn')  # what a kill inside a write would leave
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    rows = _rows(out)
    keys = [(r["image"], r["task"]) for r in rows]
    assert len(keys) == len(set(keys)) == len(clean_run)  # nothing lost, nothing twice
    by_key = {(r["image"], r["task"]): r for r in clean_run}
    assert all(r == by_key[(r["image"], r["task"])] for r in rows)  # greedy: the same results as one clean run
    assert rows[: partial.count(b"\n")] == [json.loads(line) for line in partial.splitlines()]  # kept as written


def test_parquet_output_and_input(folder, clean_run, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = sorted(folder.glob("scene00*.png"))
    table = pa.table({"id": list(range(len(images))), "image": [p.read_bytes() for p in images]})
    pq.write_table(table, tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"
    assert main(["batch", str(tmp_path / "in.parquet"), "--detect", "circle", "-o", str(out), "--model", "nano"]) == 0
    got = pq.read_table(out).to_pylist()
    assert sorted(r["image"] for r in got) == [f"in.parquet#{i}" for i in range(len(images))]
    want = {Path(r["image"]).name: r.get("result") for r in clean_run if r["task"] == "detect:circle"}
    assert all(json.loads(r["result"]) == want[images[int(r["image"].split("#")[1])].name] for r in got)
    assert not (tmp_path / "out.parquet.partial.jsonl").exists()
    assert main(["batch", str(tmp_path / "in.parquet"), "--detect", "circle", "-o", str(out), "--model", "nano"]) == 0
    assert pq.read_table(out).num_rows == len(images)  # a rerun finds everything done


def test_list_jsonl_and_glob_inputs(folder, tmp_path):
    (tmp_path / "imgs").symlink_to(folder)
    (tmp_path / "list.txt").write_text("# two scenes\nimgs/scene001.png\n\nimgs/scene002.png\n")
    assert [i.key for i in read_inputs(tmp_path / "list.txt")] == ["imgs/scene001.png", "imgs/scene002.png"]
    assert len(list(read_inputs(str(folder / "scene00*.png")))) == 10
    rows = [
        {"image": "imgs/scene001.png", "skill": "query", "question": "How many circles are there?"},
        {"image": "imgs/scene002.png", "skill": "point", "object": "circle", "settings": {"max_objects": 2}},
        {"image": "imgs/scene003.png", "skill": "detect"},  # no object
        {"image": "imgs/scene004.png"},  # the job's tasks
    ]
    lines = [json.dumps(r) for r in rows] + ["{not json"]
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    got = list(batch(str(tmp_path / "rows.jsonl"), parse_tasks(caption=["short"]), model="nano"))
    by_task = {r["task"]: r for r in got}
    assert by_task["query:How many circles are there?"]["result"]["answer"].isdigit()
    assert len(by_task["point:circle"]["result"]["points"]) <= 2
    assert by_task["caption:short"]["image"] == "imgs/scene004.png"
    errors = [r for r in got if "error" in r]
    assert {e["error"]["type"] for e in errors} == {"SettingsError"} and len(errors) == 2
    assert {e["image"] for e in errors} == {"imgs/scene003.png", f"{tmp_path / 'rows.jsonl'}:5"}  # a bad line: file:line
    assert all("object" in e["error"]["message"] or "JSON" in e["error"]["message"] for e in errors), errors


def test_bad_jobs_fail_before_reading_images(folder, tmp_path, capsys):
    assert main(["batch", str(folder), "-o", str(tmp_path / "o.jsonl"), "--model", "nano"]) == 2  # no task
    assert "no task" in capsys.readouterr().err
    assert main(["batch", str(folder), "--detect", "", "--model", "nano"]) == 2
    assert main(["batch", str(tmp_path / "missing"), "--detect", "x", "--model", "nano"]) == 2
    assert main(["batch", str(folder), "--detect", "x", "-o", str(tmp_path / "o.csv"), "--model", "nano"]) == 2
    assert "must end in .jsonl or .parquet" in capsys.readouterr().err
    with pytest.raises(Exception, match="cannot segment"):
        list(batch(str(folder), parse_tasks(segment=["circle"]), model="tiny-random"))


def test_journal_cuts_a_torn_line(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_bytes(b'{"image": "a", "task": "t", "result": 1}\n{"image": "b", "ta')
    with Journal(path) as j:
        assert j.done == {("a", "t")}
        j.write({"image": "b", "task": "t", "result": 2})
    assert _rows(path) == [{"image": "a", "task": "t", "result": 1}, {"image": "b", "task": "t", "result": 2}]


@pytest.fixture
def local_ray():
    ray = pytest.importorskip("ray", reason="Ray is an optional extra (moonbase[ray]); the test extras install it")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_the_same_job_on_a_local_ray_cluster_gives_the_same_rows(folder, clean_run, tmp_path, local_ray):
    out = tmp_path / "ray.jsonl"
    argv = ["batch", str(folder), "--caption", "short", "--detect", "circle", "-o", str(out), "--model", "nano", "--ray"]
    assert main(argv + ["--concurrency", "16"]) == 0
    rows = _rows(out)
    assert sorted(rows, key=lambda r: (r["image"], r["task"])) == sorted(clean_run, key=lambda r: (r["image"], r["task"]))
    assert main(argv) == 0 and len(_rows(out)) == len(rows)  # resumable the same way: a rerun has nothing left to do
