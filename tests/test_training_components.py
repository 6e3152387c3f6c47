"""Training building blocks: preconditioning, losses, augmentation, EMA, checkpoints, data."""

from __future__ import annotations

import os

import pytest
import torch

from edm_sampling.training.augment import AUGMENT_DIM, GeometricAugment, apply_augment, augment_parameters
from edm_sampling.training.checkpoint import atomic_save_safetensors, load_checkpoint, save_checkpoint
from edm_sampling.training.data import batch_indices, load_builtin_digits, load_image_folder
from edm_sampling.training.ema import ema_beta, ema_update
from edm_sampling.training.losses import EDMLoss, SigmaBucketLog, VELoss, VPLoss, make_loss
from edm_sampling.training.preconditioning import precondition, unet_of
from tiny_models import tiny_fourier_unet2d, tiny_unet2d, tiny_unet2d_condition

F64 = dict(rtol=1e-5, atol=1e-6)


# ---- preconditioning: Table 1, written out here from EDM_SPEC.md section 2 -----------------

def _spec(family: str, sigma: torch.Tensor, sd: float = 0.5):
    """(c_skip, c_out, c_in, c_noise) straight from the spec table."""
    if family == "edm":
        return sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt(), 1 / (sigma**2 + sd**2).sqrt(), sigma.log() / 4
    if family == "vp":
        beta_d, beta_min = 19.9, 0.1
        t = ((beta_min**2 + 2 * beta_d * (sigma**2 + 1).log()).sqrt() - beta_min) / beta_d
        return torch.ones_like(sigma), -sigma, 1 / (sigma**2 + 1).sqrt(), 999 * t
    return torch.ones_like(sigma), sigma, torch.ones_like(sigma), (sigma / 2).log()


@pytest.mark.parametrize("family", ["edm", "vp", "ve"])
def test_preconditioning_matches_spec(family):
    unet = tiny_unet2d(in_channels=1, num_class_embeds=3).double()
    denoiser = precondition(unet, family, sigma_data=0.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64) * 2
    sigma = torch.tensor([0.03, 1.0, 25.0], dtype=torch.float64)
    labels = torch.tensor([0, 2, 1])
    c_skip, c_out, c_in, c_noise = (c.reshape(-1, 1, 1, 1) for c in _spec(family, sigma))
    with torch.no_grad():
        expected = c_skip * x + c_out * unet(c_in * x, c_noise.reshape(-1), class_labels=labels).sample
        got = denoiser(x, sigma, class_labels=labels)
    torch.testing.assert_close(got, expected, **F64)
    assert unet_of(denoiser) is unet


def test_augment_conditioning_zero_is_plain_unet_and_nonzero_matters():
    unet = tiny_unet2d(in_channels=1)
    denoiser = precondition(unet, "edm", augment_dim=AUGMENT_DIM)
    x = torch.randn(2, 1, 8, 8)
    sigma = torch.tensor([0.5, 2.0])
    with torch.no_grad():
        plain = precondition(unet, "edm")(x, sigma)
        zero = denoiser(x, sigma, augment_labels=torch.zeros(2, AUGMENT_DIM))
        other = denoiser(x, sigma, augment_labels=torch.ones(2, AUGMENT_DIM))
    torch.testing.assert_close(zero, plain, rtol=0, atol=0)
    assert not torch.allclose(other, plain)
    assert not unet.time_embedding._forward_hooks  # the hook lives only during the call
    with pytest.raises(ValueError, match="augment_labels"):
        denoiser(x, sigma, augment_labels=torch.zeros(2, 3))


def test_fourier_unet_refused_unless_division_undone():
    unet = tiny_fourier_unet2d(in_channels=1).double()
    with pytest.raises(ValueError, match="fourier"):
        precondition(unet, "edm")
    denoiser = precondition(unet, "edm", undo_fourier_division=True)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([0.1, 3.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = (c.reshape(-1, 1, 1, 1) for c in _spec("edm", sigma))
    with torch.no_grad():
        t = c_noise.exp()  # the UNet takes log(t) = c_noise inside and divides by t
        expected = c_skip * x + c_out * unet(c_in * x, t.reshape(-1)).sample * t
        got = denoiser(x, sigma)
    torch.testing.assert_close(got, expected, **F64)


def test_text_conditioned_unet():
    unet = tiny_unet2d_condition()
    denoiser = precondition(unet, "edm", augment_dim=AUGMENT_DIM)
    x = torch.randn(2, 4, 8, 8)
    text = torch.randn(2, 5, 8)
    with torch.no_grad():
        out = denoiser(x, torch.tensor([0.2, 4.0]), encoder_hidden_states=text, augment_labels=torch.zeros(2, AUGMENT_DIM))
        ref = precondition(unet, "edm")(x, torch.tensor([0.2, 4.0]), encoder_hidden_states=text)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


# ---- losses -------------------------------------------------------------------------------

def _zero_denoiser(family):
    class Zero(torch.nn.Module):
        dtype = torch.float64

        def forward(self, x, t, **kwargs):
            return torch.zeros_like(x)

    from edm_sampling.training.preconditioning import VETrainingDenoiser
    from edm_sampling.denoisers import ContinuousVPDenoiser, EDMDenoiser

    return {"edm": EDMDenoiser, "vp": ContinuousVPDenoiser, "ve": VETrainingDenoiser}[family](Zero())


@pytest.mark.parametrize("family", ["edm", "vp", "ve"])
def test_zero_network_loss_is_one(family):
    """lambda(sigma) c_out(sigma)^2 = 1: a zero network scores 1 on data with std sigma_data."""
    g = torch.Generator().manual_seed(1)
    y = torch.randn(4000, 1, 8, 8, generator=g, dtype=torch.float64) * 0.5
    out = make_loss(family)(_zero_denoiser(family), y, generator=g)
    assert out.loss.shape == (4000,) and out.sigma.shape == (4000,)
    assert out.loss.mean().item() == pytest.approx(1.0, abs=0.03)


def test_loss_sigma_distributions():
    g = torch.Generator().manual_seed(0)
    s = EDMLoss().sample_sigma(200_000, g)
    q = torch.quantile(s[:100_000], torch.tensor([0.01, 0.5, 0.99]))
    assert q.tolist() == pytest.approx([0.018, 0.301, 4.91], rel=0.05)
    v = VPLoss().sample_sigma(10_000, g)
    assert 0.00099 < v.min() and v.max() < 152.2
    e = VELoss().sample_sigma(10_000, g)
    assert 0.02 <= e.min() and e.max() <= 100.0
    assert EDMLoss().weight(torch.tensor(0.5)).item() == pytest.approx((0.25 + 0.25) / (0.25 * 0.25))
    with pytest.raises(ValueError, match="loss must be one of"):
        make_loss("l2")


def test_sigma_bucket_log():
    log = SigmaBucketLog(edges=(1.0,))
    log.add(torch.tensor([1.0, 3.0, 5.0]), torch.tensor([0.5, 2.0, 4.0]))
    assert log.means() == {"sigma[0,1)": 1.0, "sigma[1,inf)": 4.0}


# ---- augmentation ----------------------------------------------------------------------------

def test_augment_geometry_exact():
    x = torch.arange(2 * 16.0).reshape(2, 1, 4, 4)
    params = torch.zeros(2, AUGMENT_DIM)
    params[0, 0] = 1  # x-flip
    params[1, 2], params[1, 3] = 1.0, -1.0  # 90 degrees
    out = apply_augment(x, params)
    torch.testing.assert_close(out[0], x[0].flip(-1), rtol=0, atol=1e-5)
    rotated = torch.rot90(x[1], 1, dims=(-2, -1))
    assert torch.allclose(out[1], rotated, atol=1e-5) or torch.allclose(out[1], torch.rot90(x[1], -1, dims=(-2, -1)), atol=1e-5)
    torch.testing.assert_close(apply_augment(x, torch.zeros(2, AUGMENT_DIM)), x, rtol=0, atol=0)


def test_augment_probability_and_determinism():
    aug = GeometricAugment(p=0.0)
    assert augment_parameters(64, aug, (8, 8), generator=torch.Generator().manual_seed(0)).abs().sum() == 0
    aug = GeometricAugment(p=1.0)
    params = augment_parameters(64, aug, (8, 8), generator=torch.Generator().manual_seed(0))
    assert (params.abs().sum(1) > 0).all()
    int_shift = params[:, 4:6]  # with fractional translation on too, only check it is finite
    assert torch.isfinite(int_shift).all()
    images = torch.randn(8, 1, 8, 8)
    a, la = GeometricAugment(p=0.5)(images, torch.Generator().manual_seed(3))
    b, lb = GeometricAugment(p=0.5)(images, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(la, lb, rtol=0, atol=0)
    unchanged = la.abs().sum(1) == 0
    torch.testing.assert_close(a[unchanged], images[unchanged], rtol=0, atol=0)
    with pytest.raises(ValueError, match="p must be in"):
        GeometricAugment(p=1.5)


# ---- EMA ---------------------------------------------------------------------------------------

def test_ema_halflife_and_rampup():
    # after half-life-many images the old weights count one half
    beta = ema_beta(100, 1000.0, images_seen=10**9)
    assert beta**10 == pytest.approx(0.5)
    # ramp-up: half-life capped at 0.05 x images seen
    assert ema_beta(100, 1000.0, images_seen=4000) == pytest.approx(0.5 ** (100 / 200))
    assert ema_beta(100, 1000.0, images_seen=4000, rampup_ratio=None) == pytest.approx(0.5 ** 0.1)
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    expected = 0.25 * a.weight.detach() + 0.75 * b.weight.detach()
    ema_update(a, b, 0.25)
    torch.testing.assert_close(a.weight.detach(), expected)


# ---- checkpoints --------------------------------------------------------------------------------

def test_checkpoint_round_trip_and_atomic(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, model=model.state_dict(), ema=model.state_dict(), optimizer=opt.state_dict(),
                    rng={"torch_cpu": torch.get_rng_state()}, state={"step": 7})
    ckpt = load_checkpoint(path)
    assert ckpt["state"] == {"step": 7}
    fresh = torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), lr=0.5)
    fresh.load_state_dict(ckpt["optimizer"])
    assert fresh.param_groups[0]["lr"] == 0.1
    torch.testing.assert_close(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    before = path.read_bytes()
    with pytest.raises(Exception):
        atomic_save_safetensors({"bad": "not a tensor"}, path, {})  # fails mid-write
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.safetensors"]
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")


# ---- data -----------------------------------------------------------------------------------

def _png(path, size=(8, 8), value=128, mode="L"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def test_image_folder(tmp_path):
    _png(tmp_path / "cat" / "a.png", value=0)
    _png(tmp_path / "dog" / "b.png", value=255)
    _png(tmp_path / "dog" / "c.PNG", value=255)
    data = load_image_folder(tmp_path)
    assert data.images.shape == (3, 1, 8, 8) and data.num_classes == 2
    assert data.labels.tolist() == [0, 1, 1]
    assert data.images[0].max() == -1.0 and data.images[1].min() == 1.0


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_image_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no PNG or JPEG"):
        load_image_folder(tmp_path / "empty")
    _png(tmp_path / "mixed" / "a.png", (8, 8))
    _png(tmp_path / "mixed" / "b.png", (16, 16))
    with pytest.raises(ValueError, match="mixed sizes"):
        load_image_folder(tmp_path / "mixed")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        load_image_folder(tmp_path / "broken")


def test_builtin_digits_and_batches():
    data = load_builtin_digits(16)
    assert data.images.shape == (1797, 1, 16, 16) and data.num_classes == 10
    assert data.images.min() >= -1 and data.images.max() <= 1
    first = batch_indices(10, seed=0, step=0, batch_size=6)
    second = batch_indices(10, seed=0, step=1, batch_size=6)  # wraps into the next epoch
    assert sorted(torch.cat([first, second[:4]]).tolist()) == list(range(10))
    torch.testing.assert_close(batch_indices(10, 0, 1, 6), second)
    with pytest.raises(ValueError, match="resolution"):
        load_builtin_digits(4)
