"""python -m engine.train --sft-from RUN: a run directory of its own that loads like any run,
starts from the source's weights, resumes, evaluates against the source, and refuses bad
requests with one clear message."""
from __future__ import annotations

import json

import pytest
import torch

from conftest_runs import make_untrained_run
from engine import train
from engine.checkpoint import latest_checkpoint, load_model_weights
from engine.config import EngineConfig
from engine.eval.instruction_eval import evaluate_instructions
from engine.eval.shape_classifier import ShapeClassifier
from engine.inference import Engine, SamplingParams
from engine.model import Transformer
from engine.run_artifacts import RunDir


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs") / "src"
    cfg, run = make_untrained_run(root, max_seq_len=160)
    torch.manual_seed(0)
    run.classifier.parent.mkdir(parents=True, exist_ok=True)
    ShapeClassifier(cfg.image.image_size).save(run.classifier)   # untrained: any judge will do
    return root


@pytest.fixture(scope="module")
def tuned(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "sft"
    assert train.main(["--sft-from", str(source), "--out", str(out), "--steps", "2",
                       "--set", "sft.examples=40", "--quiet"]) == 0
    return out


def test_sft_run_stands_on_its_own(source, tuned):
    cfg = EngineConfig.load(tuned / "config.json")
    assert cfg.sft.source_run == str(source.resolve())
    assert cfg.train.steps == 2 and cfg.sft.examples == 40
    assert cfg.model == EngineConfig.load(source / "config.json").model
    run = RunDir(tuned)
    for f in (run.bpe, run.vqvae, run.classifier):
        assert f.read_bytes() == (source / f.relative_to(tuned)).read_bytes()
    assert latest_checkpoint(tuned).name.endswith("2")
    [result] = Engine.from_run(tuned, "cpu").generate(
        [["a red circle"]], SamplingParams(modality="image", cfg_scale=1.0))
    assert result.samples[0].images


def test_sft_starts_from_the_source_weights(source, tmp_path):
    out = tmp_path / "zero"
    assert train.main(["--sft-from", str(source), "--out", str(out), "--steps", "1",
                       "--set", "train.lr=0", "--set", "sft.examples=20", "--no-eval",
                       # another seed: a fresh model would not even start out equal
                       "--set", "train.seed=7", "--quiet"]) == 0
    cfg = EngineConfig.load(out / "config.json")
    before, after = (Transformer(cfg.model, cfg.vocab.size) for _ in range(2))
    load_model_weights(latest_checkpoint(source), before, averaged=True)
    load_model_weights(latest_checkpoint(out), after, averaged=True)
    for (name, a), b in zip(before.state_dict().items(), after.state_dict().values()):
        assert torch.equal(a, b), name      # lr 0: one step changes nothing


def test_sft_evaluates_against_its_source(tuned):
    report = json.loads((tuned / "eval.json").read_text())
    for side in ("instructions", "source_instructions"):
        rates = report[side]
        for key in ("vqa_colour", "vqa_shape", "vqa_place", "vqa_count", "caption",
                    "edit_colour", "edit_shape"):
            assert 0.0 <= rates[key] <= 1.0, (side, key)
    assert (tuned / "samples" / "edits.png").is_file()
    assert (tuned / "loss.png").is_file()


def test_sft_resumes(tuned):
    assert train.main(["--out", str(tuned), "--resume", "--steps", "3", "--no-eval",
                       "--quiet"]) == 0
    assert latest_checkpoint(tuned).name.endswith("3")
    assert EngineConfig.load(tuned / "config.json").sft.source_run


@pytest.mark.parametrize("extra, message", [
    (["--preset", "small"], "drop --preset"),
    (["--resume"], "drop --sft-from"),
])
def test_sft_bad_arguments(source, tmp_path, capsys, extra, message):
    assert train.main(["--sft-from", str(source), "--out", str(tmp_path / "o"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_sft_from_a_missing_run(tmp_path, capsys):
    assert train.main(["--sft-from", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_evaluation_reports_every_rate(source):
    cfg = EngineConfig.load(source / "config.json")
    judge = ShapeClassifier.load(RunDir(source).classifier)
    report, samples = evaluate_instructions(Engine.from_run(source, "cpu"), judge,
                                            cfg.image.image_size, n=6)
    assert report["pictures"] == 6 and len(samples) == 6
    assert {instruction.split()[0] for _, instruction, _ in samples} == {"make"}
