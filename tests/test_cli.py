"""The train and generate CLIs: dry runs, and one clear message for each user error."""
import json
import subprocess
import sys

import pytest

from conftest_runs import make_untrained_run
from engine import generate, train
from engine.checkpoint import latest_checkpoint


def run_cli(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=300)


def test_dry_run_7b_prints_parameter_count():
    r = run_cli("engine.train", "--preset", "cm3leon-7b", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "6,72" in r.stdout and "B)" in r.stdout
    assert json.loads(r.stdout[: r.stdout.rindex("}") + 1])["model"]["n_layers"] == 32


@pytest.mark.parametrize("args, message", [
    (["--preset", "huge"], "unknown preset 'huge'; choose one of"),
    (["--data", "imagenet"], "unknown dataset 'imagenet'"),
    (["--set", "train.nope=1"], "bad --set"),
])
def test_train_bad_arguments(args, message, capsys, tmp_path):
    assert train.main([*args, "--out", str(tmp_path / "r")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_resume_without_a_run_or_before_any_checkpoint(capsys, tmp_path, monkeypatch):
    assert train.main(["--out", str(tmp_path / "missing"), "--resume"]) == 2
    assert "not a run directory" in capsys.readouterr().err
    # a run stopped before its first model checkpoint (in the tokenizer stage, say) resumes:
    # the pipeline keeps its finished stages and builds the rest
    calls = []
    monkeypatch.setattr("engine.pipeline.run_pipeline",
                        lambda cfg, out, **kw: calls.append((cfg.preset, kw["resume"])))
    monkeypatch.setattr("engine.host_memory.keep_freed_memory", lambda: None)
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "config.json").write_text(json.dumps({"preset": "tiny"}))
    assert train.main(["--out", str(tmp_path / "early"), "--resume", "--quiet"]) == 0
    assert calls == [("tiny", True)]


def test_existing_run_needs_resume(capsys, tmp_path):
    make_untrained_run(tmp_path / "run")
    assert train.main(["--out", str(tmp_path / "run"), "--steps", "1"]) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs") / "tiny"
    make_untrained_run(root)
    return root


def test_generate_writes_a_png(run_dir, tmp_path):
    out = tmp_path / "one.png"
    assert generate.main(["--run", str(run_dir), "--prompt", "a red circle", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["--prompt", "   "], "prompt is empty"),
    (["--prompt", "a red circle " * 40], "context"),
    (["--prompt", "x", "--n", "0"], "--n must be"),
    (["--prompt", "x", "--top-p", "0"], "--top-p"),
])
def test_generate_bad_input(run_dir, tmp_path, capsys, args, message):
    out = tmp_path / "bad.png"
    assert generate.main(["--run", str(run_dir), *args, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("*.tmp*"))


def test_generate_missing_run_and_corrupt_checkpoint(tmp_path, capsys):
    assert generate.main(["--run", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path / "o.png")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    make_untrained_run(tmp_path / "run")
    f = latest_checkpoint(tmp_path / "run") / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    assert generate.main(["--run", str(tmp_path / "run"), "--prompt", "x", "--out", str(tmp_path / "o.png")]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_a_device_the_machine_lacks_is_one_clear_error(run_dir, tmp_path, capsys):
    out = tmp_path / "never"
    assert train.main(["--out", str(out), "--device", "cuda", "--steps", "1"]) == 2
    assert "device 'cuda'" in capsys.readouterr().err and not out.exists()
    assert generate.main(["--run", str(run_dir), "--prompt", "x", "--device", "cuda:1",
                          "--out", str(tmp_path / "x.png")]) == 2
    assert "device 'cuda:1'" in capsys.readouterr().err
    assert train.main(["--out", str(out), "--device", "gpu0"]) == 2
    assert "not a device name" in capsys.readouterr().err


def test_generate_in_bfloat16(run_dir, tmp_path):
    import torch
    from engine.inference import Engine
    engine = Engine.from_run(run_dir, "cpu", dtype="bfloat16")
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    out = tmp_path / "bf16.png"
    assert generate.main(["--run", str(run_dir), "--prompt", "a red circle", "--dtype",
                          "bfloat16", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        Engine.from_run(run_dir, "cpu", dtype="float16")
