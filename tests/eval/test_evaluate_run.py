import json

from conftest_runs import make_untrained_run
from engine.data.shapes import ALL_PAIRS
from engine.eval import evaluate_run


def test_evaluates_a_run_and_writes_json(tmp_path):
    make_untrained_run(tmp_path / "run")
    out = tmp_path / "acc.json"
    rc = evaluate_run.main(["--run", str(tmp_path / "run"), "--samples-per-pair", "1",
                            "--cfg", "3", "--json", str(out), "--grids", str(tmp_path / "g")])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["samples_per_pair"] == 1 and report["pairs"] == len(ALL_PAIRS)
    assert set(report["cfg_3"]) == {"colour", "colour_heldout", "colour_shape",
                                    "colour_shape_heldout", "blank"}
    assert (tmp_path / "g" / "grid_cfg3.png").is_file()


def test_missing_run_is_a_clear_error(tmp_path, capsys):
    assert evaluate_run.main(["--run", str(tmp_path / "nope")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_bad_draw_count_is_a_clear_error(tmp_path, capsys):
    make_untrained_run(tmp_path / "run")
    assert evaluate_run.main(["--run", str(tmp_path / "run"), "--samples-per-pair", "0"]) == 2
    assert "--samples-per-pair must be >= 1" in capsys.readouterr().err
