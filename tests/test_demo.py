"""The newcomer's demo, at a smaller scale, through the same entry points (tools/demo.py)."""
import csv
import os
import re

import pytest

from conftest import TWO_PHASES, run_tool, write_recipe


@pytest.mark.slow
def test_demo_pipeline_end_to_end(tmp_path):
    recipe = dict(TWO_PHASES, reference_workers=2)
    recipe["phases"] = [dict(p, epochs=e) for p, e in zip(TWO_PHASES["phases"], ([0, 2], [2, 3]))]
    path = write_recipe(str(tmp_path), recipe)
    out = str(tmp_path / "demo")
    args = ["tools/demo.py", "--out", out, "--train-per-class", "8", "--val-per-class", "3", "--recipe", path,
            "--sizes", "40", "72", "--target-top1", "0.05"]
    proc = run_tool(args, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # all of it: a rank's crash report can be long
    for title in ("1/5 generate", "2/5 pack", "3/5 train", "4/5 evaluate", "5/5 export", "demo done"):
        assert title in proc.stdout
    with open(os.path.join(out, "run", "sweep.csv")) as f:
        rows = list(csv.DictReader(f))
    # 80 images: 3 steps per epoch at 16 x 2 ranks (2 epochs), then 5 at 8 x 2 (1 epoch)
    assert [int(r["step"]) for r in rows] == [3, 6, 11]
    assert {r["images"] for r in rows} == {"30"}
    assert "time to top-1 >= 5.00%" in proc.stdout
    assert os.path.getsize(os.path.join(out, "run", "sweep.png")) > 0
    # The summary ends with one validation image classified by the exported best checkpoint.
    last = proc.stdout.rstrip().splitlines()[-1]
    first_class = sorted(os.listdir(os.path.join(out, "images", "val")))[0]
    match = re.fullmatch(r"prediction for (\S+) \(true class (\w+)\): \w+ \d+\.\d%(, \w+ \d+\.\d%){2}", last)
    assert match, last
    assert match.group(2) == first_class and f"/val/{first_class}/" in match.group(1)
    assert os.path.isfile(os.path.join(out, "run", "export", "best", "model-symbol.json"))
    assert os.path.isfile(os.path.join(out, "run", "export", "best", "model.onnx"))
    assert f"report: {os.path.join(out, 'run', 'report.png')}" in proc.stdout
    assert os.path.getsize(os.path.join(out, "run", "report.png")) > 0
    # Rank 0 only writes TensorBoard events: one file from the two ranks.
    assert len(os.listdir(os.path.join(out, "run", "tensorboard", "train"))) == 1

    again = run_tool(args, timeout=900)  # re-running continues: nothing is trained or evaluated twice
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already packed" in again.stdout and "3 checkpoint(s) already evaluated" in again.stdout
    assert "resuming from ckpt-00000011" in again.stdout
    assert "replaced " + os.path.join(out, "run", "export", "best") in again.stdout
    assert again.stdout.rstrip().splitlines()[-1].startswith("prediction for ")
