"""python -m engine.generate --prompts FILE --out-dir DIR: every prompt sampled once, its
samples independent of the batch size, and an interrupted job continued where it stopped with
the samples an uninterrupted one draws."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from conftest_runs import make_untrained_run
from engine import generate

PROMPTS = """# one prompt a line
a red circle
a blue square on the left

a small green triangle
a <mask> circle
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs") / "tiny"
    make_untrained_run(root)
    return root


@pytest.fixture()
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPTS)
    return path


def _sample(run_dir, prompts, out, *extra) -> int:
    return generate.main(["--run", str(run_dir), "--prompts", str(prompts), "--out-dir", str(out),
                          "--n", "2", "--max-new-tokens", "4", "--seed", "7", *extra])


def _contents(out) -> dict:
    return {p.name: p.read_bytes() for p in out.iterdir()}


def test_every_prompt_once_at_the_models_size(run_dir, prompts, tmp_path):
    out = tmp_path / "out"
    assert _sample(run_dir, prompts, out, "--batch-size", "3") == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    assert [r["prompt"] for r in records][:2] == ["a red circle", "a blue square on the left"]
    for r in records[:3]:
        assert r["images"] == [f"{r['index']:05d}_0.png", f"{r['index']:05d}_1.png"]
        assert all(Image.open(out / name).size == (32, 32) for name in r["images"])
    infill = records[3]   # "<mask>": text, no picture
    assert infill["images"] == [] and len(infill["texts"]) == 2


def test_samples_do_not_depend_on_the_batch_size(run_dir, prompts, tmp_path):
    assert _sample(run_dir, prompts, tmp_path / "one", "--batch-size", "1") == 0
    assert _sample(run_dir, prompts, tmp_path / "four", "--batch-size", "4") == 0
    assert _contents(tmp_path / "one") == _contents(tmp_path / "four")


def test_an_interrupted_job_continues(run_dir, prompts, tmp_path, capsys):
    whole = tmp_path / "whole"
    assert _sample(run_dir, prompts, whole, "--batch-size", "2") == 0
    cut = tmp_path / "cut"
    assert _sample(run_dir, prompts, cut, "--batch-size", "2") == 0
    # as if stopped after the first batch: the last two prompts' lines and pictures are gone
    lines = (cut / "results.jsonl").read_text().splitlines()
    (cut / "results.jsonl").write_text("\n".join(lines[:2]) + "\n")
    for name in json.loads(lines[2])["images"]:
        (cut / name).unlink()
    capsys.readouterr()
    assert _sample(run_dir, prompts, cut, "--batch-size", "2") == 0
    assert "sampled 2 of 4 prompts" in capsys.readouterr().out
    assert _contents(cut) == _contents(whole)


@pytest.mark.parametrize("args, message", [
    (["--out-dir", "X"], "--out-dir goes with --prompts"),
    (["--prompts", "P"], "--prompts needs --out-dir"),
    (["--prompts", "P", "--out-dir", "X", "--prompt", "a"], "drop --prompt"),
    (["--prompts", "P", "--out-dir", "X", "--batch-size", "0"], "--batch-size"),
    (["--prompts", "missing.txt", "--out-dir", "X"], "no prompts file"),
    (["--prompts", "EMPTY", "--out-dir", "X"], "holds no prompts"),
])
def test_bad_batch_arguments(run_dir, prompts, tmp_path, capsys, args, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    args = [str(prompts) if a == "P" else str(empty) if a == "EMPTY" else
            str(tmp_path / a) if a in ("X", "missing.txt") else a for a in args]
    assert generate.main(["--run", str(run_dir), *args]) == 2
    assert message in capsys.readouterr().err


def test_each_line_has_a_seed_of_its_own(run_dir, tmp_path):
    # the same prompt twice: lines 0 and 1 draw with seeds 7 and 8, so differently
    path = tmp_path / "twice.txt"
    path.write_text("a red circle\na red circle\n")
    out = tmp_path / "out"
    assert _sample(run_dir, path, out) == 0
    assert (out / "00000_0.png").read_bytes() != (out / "00001_0.png").read_bytes()


@pytest.fixture()
def picture_prompts(tmp_path):
    """A .jsonl job over two pictures: a caption, a question and a text line. (An edit, a
    picture in and one out, does not fit the untrained run's 96-token context.)"""
    folder = tmp_path / "job"
    (folder / "pics").mkdir(parents=True)
    Image.new("RGB", (40, 30), "red").save(folder / "pics" / "a.png")
    Image.new("RGB", (16, 16), "blue").save(folder / "pics" / "b.png")
    lines = [{"image": "pics/a.png"}, {"image": "pics/b.png", "prompt": "what colour is it?"},
             {"prompt": "a red circle"}]
    path = folder / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    return path


def test_jsonl_lines_caption_and_answer_about_pictures(run_dir, picture_prompts, tmp_path):
    out = tmp_path / "out"
    assert _sample(run_dir, picture_prompts, out, "--batch-size", "3") == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["image"] and r["image"].split("/")[-1]) for r in records] == [
        (None, "a.png"), ("what colour is it?", "b.png"), ("a red circle", None)]
    caption, answer, drawn = records
    for r in (caption, answer):   # text out, two samples each
        assert r["images"] == [] and len(r["texts"]) == 2
    assert drawn["images"] == ["00002_0.png", "00002_1.png"]
    # One job in batches of 1 and of 4 writes the same bytes.
    assert _sample(run_dir, picture_prompts, tmp_path / "one", "--batch-size", "1") == 0
    assert _sample(run_dir, picture_prompts, tmp_path / "four", "--batch-size", "4") == 0
    assert _contents(tmp_path / "one") == _contents(tmp_path / "four")


def test_a_caption_line_matches_the_single_image_command(run_dir, picture_prompts, tmp_path,
                                                          capsys):
    """Line 0 ({"image"} alone, seed 7 + 0) captions as --image with --seed 7 does."""
    out = tmp_path / "out"
    assert _sample(run_dir, picture_prompts, out) == 0
    caption = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    capsys.readouterr()
    assert generate.main(["--run", str(run_dir), "--image",
                          str(picture_prompts.parent / "pics" / "a.png"), "--n", "2",
                          "--max-new-tokens", "4", "--seed", "7"]) == 0
    assert capsys.readouterr().out.splitlines() == caption["texts"]


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "images": "x.png"}', 'prompts.jsonl:2: expected an object'),
    ('not json', 'prompts.jsonl:2: not a JSON object'),
    ('{"prompt": ""}', 'prompts.jsonl:2: "prompt" must be non-empty'),
    ('{"image": "missing.png"}', 'prompts.jsonl:2: image file'),
    ('{"image": 3}', 'prompts.jsonl:2: "image" must be a file name'),
])
def test_bad_jsonl_lines_fail_with_their_line(run_dir, tmp_path, capsys, line, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a red circle"}\n' + line + "\n")
    assert generate.main(["--run", str(run_dir), "--prompts", str(path),
                          "--out-dir", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()   # nothing sampled, nothing written
