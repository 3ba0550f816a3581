"""The demo in miniature: every method runs a few steps and the report has its tables and figures."""
import json
import os

from toy.demo import main


def test_quick_demo_writes_report_tables_and_plots(tmp_path):
    out = str(tmp_path / "demo")
    assert main(["--out", out, "--quick"]) == 0
    report = open(os.path.join(out, "report.md")).read()
    # the paper-style columns of each method's table
    for col in ["reward_teacher (N=50)", "reward_student_init", "reward_student", "kl_student_teacher",
                "mode before", "mode after", "centre after", "t=0",
                "kl_init_teacher", "kl_student_tilted", "reward_tilted"]:
        assert f"| {col} |" in report or f" {col} |" in report, col
    for png in ["rats_curves.png", "otca_curves.png", "rtdmd_curves.png", "samples.png"]:
        path = os.path.join(out, png)
        assert os.path.getsize(path) > 5000, png                     # a real picture, not an empty canvas
        assert f"]({png})" in report
    numbers = json.load(open(os.path.join(out, "report.json")))
    assert set(numbers) == {"rats", "otca", "rtdmd"}
    assert len(numbers["rats"]) == 5 and all(r["reward_student"] is not None for r in numbers["rats"])
    assert {"gaps.md", "tilted.png", "datasets.png"} <= set(os.listdir(os.path.join(out, "toy")))
