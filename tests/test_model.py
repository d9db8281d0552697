import dataclasses

import pytest
import torch

from engine.config import get_preset
from engine.inference.kv_cache import ContiguousKVCache
from engine.model import Transformer
from engine.tokenizer.vocab import Vocab


def tiny_model(**over):
    cfg = dataclasses.replace(get_preset("tiny").model, n_layers=2, d_model=64, n_heads=4,
                              max_seq_len=64, **over)
    return Transformer(cfg, 300).eval()


def test_seven_b_preset_has_paper_shapes_and_size():
    cfg = get_preset("cm3leon-7b")
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.model.n_heads) == (32, 4096, 32)
    assert cfg.vocab.size == 64_512 and cfg.model.max_seq_len == 4_096
    assert cfg.vocab.text_size == 56_320 and cfg.vocab.image_codes == 8_192
    with torch.device("meta"):
        model = Transformer(cfg.model, Vocab.from_config(cfg.vocab).size)
    assert 6.5e9 <= model.num_parameters() <= 7.0e9


@pytest.mark.slow
def test_two_layer_slice_of_7b_runs_a_forward_with_full_vocab():
    cfg = get_preset("cm3leon-7b")
    sliced = dataclasses.replace(cfg.model, n_layers=2)
    torch.manual_seed(0)
    model = Transformer(sliced, cfg.vocab.size).to(torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab.size, (1, 16))
    with torch.no_grad():
        logits = model.logits(model(ids))
    assert logits.shape == (1, 16, 64_512) and torch.isfinite(logits).all()


@pytest.mark.parametrize("position", ["learned", "rope"])
@pytest.mark.parametrize("kv_heads", [None, 2])
def test_cached_decode_equals_full_forward(kv_heads, position):
    model = tiny_model(n_kv_heads=kv_heads, position=position)
    ids = torch.randint(0, 300, (3, 20))
    with torch.no_grad():
        full = model(ids)
        c = model.cfg
        cache = ContiguousKVCache(c.n_layers, 3, c.kv_heads, c.head_dim, 20)
        parts = [model(ids[:, :12], cache=cache)]
        for t in range(12, 20):
            parts.append(model(ids[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_packed_documents_do_not_see_each_other(position):
    model = tiny_model(position=position)
    a, b = torch.randint(0, 300, (1, 10)), torch.randint(0, 300, (1, 6))
    packed = torch.cat([a, b], 1)
    positions = torch.cat([torch.arange(10), torch.arange(6)])[None]
    cu = torch.tensor([0, 10, 16], dtype=torch.int32)
    with torch.no_grad():
        h = model(packed, positions=positions, cu_seqlens=cu)
        torch.testing.assert_close(h[:, :10], model(a), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(h[:, 10:], model(b), atol=1e-5, rtol=1e-4)


def test_rope_attention_depends_on_offsets_only():
    # Shifting every position of a document by the same amount changes nothing under rope.
    model = tiny_model(position="rope")
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        base = model(ids, positions=torch.arange(12)[None])
        shifted = model(ids, positions=torch.arange(30, 42)[None])
    torch.testing.assert_close(shifted, base, atol=1e-5, rtol=1e-4)
    with torch.no_grad():   # while learned positions see the shift
        learned = tiny_model(position="learned")
        assert not torch.allclose(learned(ids, positions=torch.arange(12)[None]),
                                  learned(ids, positions=torch.arange(30, 42)[None]), atol=1e-3)


def test_unknown_position_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model.position 'alibi'"):
        tiny_model(position="alibi")


def test_context_overflow_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="exceeds the context length 64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_tied_embeddings_and_no_biases():
    model = tiny_model()
    assert model.lm_head.weight is model.tok_emb.weight
    assert not any(n.endswith("bias") for n, _ in model.named_parameters())
    assert not any("ln" in n for n, _ in model.named_parameters())   # LayerNorm without affine


def test_a_runs_initial_weights_depend_on_its_seed_alone():
    # earlier stages draw from the global RNG only when they train, not when they load
    from engine.pipeline import initial_model
    cfg = get_preset("tiny")
    torch.manual_seed(5)
    a = initial_model(cfg, 600)
    torch.randn(1000)  # a stage that trained in this process
    b = initial_model(cfg, 600)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
