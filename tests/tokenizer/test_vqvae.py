import pytest
import torch

from engine.config import ImageConfig
from engine.data.shapes import ShapesDataset
from engine.tokenizer.vq_train import train_vqvae
from engine.tokenizer.vqvae import VQVAE, images_to_tensor, tensor_to_images

CFG = ImageConfig(image_size=32, downsample=4, channels=16, code_dim=8, train_steps=250,
                  batch_size=16, lr=3e-3)
CODES = 64


@pytest.fixture(scope="module")
def trained():
    return train_vqvae(CFG, CODES, ShapesDataset("train", 32, 300), seed=0, progress=False)


@pytest.fixture(scope="module")
def images():
    ds = ShapesDataset("heldout", 32, 16)
    return images_to_tensor([ds[i].image for i in range(len(ds))])


def test_encode_decode_shapes_and_code_range(trained, images):
    codes = trained.encode(images)
    assert codes.shape == (16, 64) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < CODES
    out = trained.decode(codes)
    assert out.shape == (16, 3, 32, 32)
    assert out.min() >= 0 and out.max() <= 1


def test_decode_then_encode_mostly_returns_the_same_codes(trained, images):
    codes = trained.encode(images)
    again = trained.encode(trained.decode(codes))
    # Fully trained (tiny preset) the round trip keeps ~80% of codes; briefly trained (250 steps) 74-80%.
    assert (again == codes).float().mean() > 0.5


def test_training_beats_an_untrained_model(trained, images):
    untrained = VQVAE(CFG, CODES).eval()
    def mse(m):
        return torch.mean((m.decode(m.encode(images)) - images) ** 2).item()
    assert mse(trained) < 0.5 * mse(untrained)


def test_save_load_is_exact(trained, images, tmp_path):
    path = tmp_path / "vq.safetensors"
    trained.save(path)
    loaded = VQVAE.load(path, CFG, CODES)
    codes = trained.encode(images)
    assert torch.equal(loaded.encode(images), codes)
    assert torch.equal(loaded.decode(codes), trained.decode(codes))


def test_load_rejects_a_mismatched_config(trained, tmp_path):
    path = tmp_path / "vq.safetensors"
    trained.save(path)
    with pytest.raises(ValueError, match="does not match"):
        VQVAE.load(path, CFG, CODES * 2)


def test_wrong_image_size_names_the_expected_size(trained):
    with pytest.raises(ValueError, match="32"):
        trained.encode(torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError, match="64"):
        trained.decode(torch.zeros(2, 10, dtype=torch.long))


def test_pil_round_trip():
    t = torch.rand(3, 3, 32, 32)
    back = images_to_tensor(tensor_to_images(t))
    assert back.shape == t.shape and torch.allclose(back, t, atol=1 / 255)


@pytest.mark.cuda
def test_training_on_the_gpu(images, tmp_path):
    # what build_vqvae does on a GPU machine: train there, use there, save from there
    vq = train_vqvae(CFG, CODES, ShapesDataset("train", 32, 300), seed=0, progress=False,
                     device="cuda")
    assert vq.quantizer.embed.is_cuda
    untrained = VQVAE(CFG, CODES).eval()
    err = ((vq.decode(vq.encode(images)).cpu() - images) ** 2).mean()
    assert err < 0.5 * ((untrained.decode(untrained.encode(images)) - images) ** 2).mean()
    assert vq.encode(images).is_cuda  # inputs from the CPU move to the codebook's device
    vq.save(tmp_path / "vq.safetensors")
    back = VQVAE.load(tmp_path / "vq.safetensors", CFG, CODES)
    assert torch.equal(back.quantizer.embed, vq.quantizer.embed.cpu())
