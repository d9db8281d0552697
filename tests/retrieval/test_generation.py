"""Retrieval at generation on an untrained run: the training stage writes its files, the
engine prepends the retrieved documents, the CLI flag works, the encoder re-ranks samples."""
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.data.corpus import EncodedCorpus
from engine.retrieval.selection import content_key

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest_runs import make_untrained_run  # noqa: E402

CAPTIONS = ["a red circle", "a blue square on the left", "a red circle on the left",
            "a small red circle", "a blue square"]


@pytest.fixture(scope="module")
def rag_run(tmp_path_factory):
    from engine.retrieval.stage import RetrievalDir, build_retrieval
    from engine.tokenizer.bpe import TextTokenizer
    from engine.tokenizer.vocab import Vocab
    root = tmp_path_factory.mktemp("rag")
    before = torch.get_num_threads()
    torch.set_num_threads(1)        # tiny models: see conftest.py
    try:
        cfg, run = make_untrained_run(root, max_seq_len=320)
        cfg.retrieval = dataclasses.replace(cfg.retrieval, enabled=True, embed_dim=16, width=16,
                                            text_layers=1, encoder_steps=10, encoder_batch=16, shards=2)
        cfg.save(run.config)
        text = TextTokenizer.load(run.bpe, Vocab.from_config(cfg.vocab))
        rng = np.random.default_rng(0)
        caps = [text.encode(CAPTIONS[i % len(CAPTIONS)]) for i in range(40)]
        codes = torch.from_numpy(rng.integers(0, cfg.vocab.image_codes, size=(40, cfg.image.tokens_per_image)))
        corpus = EncodedCorpus(caps, codes)
        run.corpus.parent.mkdir(parents=True, exist_ok=True)
        corpus.save(run.corpus)
        neighbours = build_retrieval(root, cfg, corpus, progress=False)
    finally:
        torch.set_num_threads(before)
    return root, cfg, neighbours, RetrievalDir(root)


def test_stage_writes_its_files(rag_run):
    root, cfg, neighbours, rd = rag_run
    names = {p.name for p in rd.root.iterdir()}
    assert {"dual_encoder.safetensors", "bank.faiss", "bank_ids.npy", "manifest.json",
            "neighbours_00000-of-00002.npy", "neighbours_00001-of-00002.npy"} <= names
    assert neighbours.shape == (40, 2)


def test_engine_prepends_retrieved_documents(rag_run):
    from engine.inference import SamplingParams
    from engine.retrieval.generation import RetrievalEngine
    root, cfg, _, _ = rag_run
    engine = RetrievalEngine.from_run(root, "cpu", k=2)
    plain = engine.prepare("a red circle", SamplingParams())
    [result] = engine.generate("a red circle", SamplingParams(n=1))
    [ids] = engine.last_retrieved
    assert len(ids) == 2
    r = engine.retriever
    # never a document with the prompt's exact caption
    assert all(r.cap_keys[i] != content_key(engine.tok.text.encode("a red circle")) for i in ids)
    assert plain.cond[1:1 + len(r.prefix_ids(ids))] == r.prefix_ids(ids)
    assert plain.uncond == [engine.vocab.bos, engine.vocab.mask, engine.vocab.brk]
    assert len(result.samples[0].images) == 1


def test_generate_cli_flag(rag_run, tmp_path, capsys):
    from engine.generate import main
    root, _, _, _ = rag_run
    out = tmp_path / "x.png"
    assert main(["--run", str(root), "--prompt", "a red circle", "--retrieve", "2", "--out", str(out)]) == 0
    assert out.is_file()
    assert main(["--run", str(root), "--prompt", "a red circle", "--retrieve", "-1", "--out", str(out)]) == 2


def test_encoder_reranks_samples(rag_run):
    from engine.inference import Engine, SamplingParams
    from engine.retrieval.dual_encoder import DualEncoder
    root, _, _, rd = rag_run
    engine = Engine.from_run(root, "cpu")
    enc = DualEncoder.load(rd.encoder, tokenizer=engine.tok)
    [result] = engine.generate("a red circle", SamplingParams(n=3), scorer=enc.score)
    scores = [s.score for s in result.samples]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] == pytest.approx(float(enc.score("a red circle", result.samples[0].images[0])), abs=1e-5)
