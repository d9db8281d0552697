"""Validation loss during training (engine/validation.py): every validation document counts
once, the number is the model's mean loss per target token on them, and measuring it leaves
the training exactly as it was."""
from __future__ import annotations

import dataclasses

import torch

from engine import validation
from engine.config import get_preset
from engine.data.corpus import EncodedCorpus
from engine.data.packing import IGNORE, Packer
from engine.model import Transformer
from engine.trainer import _read_metrics, train_model
from tests.training_cases import VOCAB, random_documents, small_model_config


def _docs(n: int, seed: int = 0) -> list[list[int]]:
    stream = random_documents(seed, lengths=(5, 30))
    return [next(stream) + [VOCAB.eos] for _ in range(n)]


def test_all_batches_holds_every_document_once():
    docs = _docs(23)
    batches = Packer(iter(docs), VOCAB, 64).all_batches(3)
    seen = []
    for b in batches:
        cu = b.cu_seqlens.tolist()
        flat = b.ids.flatten().tolist()
        seen += [flat[a:z] for a, z in zip(cu, cu[1:]) if flat[a] != VOCAB.pad]
    assert seen == docs
    assert sum(b.num_targets for b in batches) == sum(len(d) - 1 for d in docs)


def test_the_loss_is_the_mean_over_every_target_token():
    torch.manual_seed(0)
    model = Transformer(small_model_config(), VOCAB.size).eval()
    docs = _docs(11, seed=1)
    measured = validation.loss(model, Packer(iter(docs), VOCAB, 64).all_batches(2),
                               torch.device("cpu"), use_bf16=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for doc in docs:  # one document at a time, unpacked
            ids = torch.tensor([doc])
            targets = torch.roll(ids, -1)
            targets[0, -1] = IGNORE
            total += float(model.loss(model(ids), targets)) * (len(doc) - 1)
            count += len(doc) - 1
    assert abs(measured - total / count) < 1e-5


def test_plain_documents_are_caption_then_image():
    corpus = EncodedCorpus(captions=[[VOCAB.bpe_start + 3, VOCAB.bpe_start + 9]],
                           codes=torch.tensor([[0, 5]]))
    [[batch]] = validation.batches({"val": corpus}, VOCAB, 16, 1).values()
    assert batch.ids[0, :7].tolist() == [VOCAB.bos, VOCAB.bpe_start + 3, VOCAB.bpe_start + 9,
                                         VOCAB.brk, VOCAB.image_token(0), VOCAB.image_token(5),
                                         VOCAB.eos]


def test_validating_leaves_the_training_as_it_was(tmp_path):
    tcfg = dataclasses.replace(get_preset("tiny").train, steps=6, batch_size=2, warmup_steps=2,
                               checkpoint_every=100, log_every=4, eval_every=3, ema_decay=0.0,
                               autocast_bf16=True)
    val = {"val": Packer(iter(_docs(9, seed=2)), VOCAB, 64).all_batches(2)}
    weights = []
    for name, sets in (("plain", None), ("validated", val)):
        torch.manual_seed(0)
        model = Transformer(small_model_config(), VOCAB.size)
        (tmp_path / name).mkdir()
        train_model(model, random_documents, VOCAB, tcfg, tmp_path / name, torch.device("cpu"),
                    resume=False, progress=False, validation=sets)
        weights.append(model.state_dict())
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k
    records = _read_metrics(tmp_path / "validated")
    assert [r["step"] for r in records] == [3, 4, 6]   # eval steps join the log steps
    assert [("val_loss" in r) for r in records] == [True, False, True]
    assert all("val_loss" not in r for r in _read_metrics(tmp_path / "plain"))


def test_the_average_is_validated_too_and_the_training_weights_come_back(tmp_path):
    """With an EMA the validation sets are also measured on the averaged weights (the ones
    inference uses), and the training weights go back bit for bit afterwards."""
    tcfg = dataclasses.replace(get_preset("tiny").train, steps=6, batch_size=2, warmup_steps=2,
                               checkpoint_every=100, log_every=4, eval_every=3, ema_decay=0.9,
                               autocast_bf16=False)
    val = {"val": Packer(iter(_docs(9, seed=2)), VOCAB, 64).all_batches(2)}
    models = {}
    for name, sets in (("plain", None), ("validated", val)):
        torch.manual_seed(0)
        models[name] = Transformer(small_model_config(), VOCAB.size)
        (tmp_path / name).mkdir()
        train_model(models[name], random_documents, VOCAB, tcfg, tmp_path / name,
                    torch.device("cpu"), resume=False, progress=False, validation=sets)
    plain, validated = (models[n].state_dict() for n in ("plain", "validated"))
    for k in plain:   # the EMA the models leave training with is the same too
        assert torch.equal(plain[k], validated[k]), k
    records = _read_metrics(tmp_path / "validated")
    assert [("val_ema_loss" in r) for r in records] == [True, False, True]
    last = records[-1]
    # The model leaves training holding the EMA: measuring it now repeats the last reading.
    again = validation.loss(models["validated"], val["val"], torch.device("cpu"), use_bf16=False)
    assert abs(last["val_ema_loss"] - again) < 1e-6
    assert abs(last["val_ema_loss"] - last["val_loss"]) > 1e-4   # two different weight sets


def test_the_loss_curve_pairs_each_set_with_its_ema(tmp_path):
    """loss.png: a line for the training loss, and per validation set one line for the
    training weights and a dashed one of the same colour for the EMA."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from engine.eval import report
    metrics = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0, "val_loss": 2.5,
                                          "val_ema_loss": 2.4, "b_loss": 2.8}]
    drawn = {}
    real_savefig = plt.Figure.savefig

    def keep(fig, *args, **kwargs):
        drawn.update({line.get_label(): line for line in fig.axes[0].get_lines()})
        return real_savefig(fig, *args, **kwargs)

    plt.Figure.savefig = keep
    try:
        report.write_loss_curve(metrics, tmp_path / "loss.png")
    finally:
        plt.Figure.savefig = real_savefig
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert set(drawn) == {"training (CM3, target positions)", "val", "val (EMA)", "b"}
    assert drawn["val"].get_color() == drawn["val (EMA)"].get_color() != drawn["b"].get_color()
    assert drawn["val (EMA)"].get_linestyle() == "--" and drawn["val"].get_linestyle() == "-"
