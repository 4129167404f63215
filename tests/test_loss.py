"""Losses, the noise schedule and the training-time draws, against hand computation."""

import math
from types import SimpleNamespace

import pytest
import torch

from megatron_transfusion.batch import ImageSegment, SpecialTokens, TextSegment, pack_documents
from megatron_transfusion.config import DiffusionConfig
from megatron_transfusion.diffusion import CosineSchedule, noise_images
from megatron_transfusion.diffusion.schedule import loss_weights, sample_timesteps
from megatron_transfusion.loss import LossTerms, transfusion_loss
from megatron_transfusion.training.step import GlobalBatch, MicroBatch, batch_losses

SPECIAL = SpecialTokens(pad=0, bos=3, eos=4, boi=1, eoi=2)


def toy_batch(caption_first=(True,)):
    # row: [7 8 BOI p p EOI 9] [10 11] pad pad
    rows = [
        [
            [
                TextSegment([7, 8]),
                ImageSegment(torch.ones(1, 1, 2), caption_first[0]),
                TextSegment([9]),
            ],
            [TextSegment([10, 11])],
        ]
    ]
    return pack_documents(rows, 11, 2, (1, 1, 2), SPECIAL)


def test_lm_targets_by_hand():
    batch = toy_batch()
    assert batch.tokens[0].tolist() == [7, 8, 1, 0, 0, 2, 9, 10, 11, 0, 0]
    labels, mask = batch.lm_targets()
    # 7→8, 8→BOI trained; BOI→patch, inside the image, last patch→EOI not; EOI→9 trained;
    # 9→10 crosses documents; 10→11 trained; 11→pad and padding not.
    assert mask[0].tolist() == [1, 1, 0, 0, 0, 1, 0, 1, 0, 0, 0]
    assert labels[0][mask[0]].tolist() == [8, 1, 9, 11]
    assert batch.positions[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 0, 0]


def test_lm_loss_equals_hand_computation():
    batch = toy_batch()
    labels, mask = batch.lm_targets()
    vocab = 12
    logits = torch.randn(1, 11, vocab, generator=torch.Generator().manual_seed(0))
    token_losses = torch.nn.functional.cross_entropy(
        logits.view(-1, vocab), labels.view(-1), reduction="none"
    ).view(1, 11)
    hand = []
    for i in range(11):
        if mask[0, i]:
            row = logits[0, i].tolist()
            log_z = math.log(sum(math.exp(x) for x in row))
            hand.append(log_z - row[int(labels[0, i])])
    empty = torch.zeros(0, 1, 1, 2)
    loss = transfusion_loss(token_losses, mask, empty, empty, diffusion_weight=5.0)
    assert loss.lm.item() == pytest.approx(sum(hand) / len(hand), rel=1e-5)
    assert loss.total.item() == pytest.approx(loss.lm.item())


def test_diffusion_loss_is_the_per_image_mean_of_squared_error():
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(3, 8, 4, 4, generator=generator)
    offsets = torch.tensor([0.0, 0.5, 2.0])
    predicted = noise + offsets.view(3, 1, 1, 1)  # a known error per image
    lm = torch.zeros(1, 4)
    loss = transfusion_loss(lm, torch.ones(1, 4, dtype=torch.bool), predicted, noise, 5.0)
    assert loss.diffusion.item() == pytest.approx((0 + 0.25 + 4.0) / 3)


@pytest.mark.parametrize("weight", [0.0, 1.0, 5.0, 7.5])
def test_lambda_weighting(weight):
    token_losses = torch.tensor([[1.0, 2.0, 3.0]])
    mask = torch.tensor([[True, True, False]])
    noise = torch.zeros(1, 2, 2, 2)
    loss = transfusion_loss(token_losses, mask, noise + 1.0, noise, weight)
    assert loss.lm.item() == pytest.approx(1.5)
    assert loss.diffusion.item() == pytest.approx(1.0)
    assert loss.total.item() == pytest.approx(1.5 + weight * 1.0)


def test_cosine_schedule_closed_form():
    schedule = CosineSchedule.create(1000)
    abar = schedule.alphas_cumprod
    assert abar.shape == (1000,)
    assert bool((abar[1:] < abar[:-1]).all()), "noise grows with t"
    t = torch.arange(1000, dtype=torch.float64)
    assert (abar.sqrt() - torch.cos(t / 1000 * math.pi / 2)).abs().max() < 0.02
    assert abar[0] > 0.999 and abar[-1] < 1e-4
    # x_t = sqrt(ᾱ_t)·x_0 + sqrt(1-ᾱ_t)·ε, per image.
    x0, eps = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    steps = torch.tensor([10, 900])
    xt = schedule.add_noise(x0, eps, steps)
    for i, s in enumerate(steps.tolist()):
        a = float(abar[s])
        torch.testing.assert_close(xt[i], math.sqrt(a) * x0[i] + math.sqrt(1 - a) * eps[i])


def test_noise_limit_for_images_before_their_caption():
    cfg = DiffusionConfig()
    generator = torch.Generator().manual_seed(0)
    image_first = sample_timesteps(torch.zeros(20000, dtype=torch.bool), cfg, generator)
    caption_first = sample_timesteps(torch.ones(20000, dtype=torch.bool), cfg, generator)
    assert image_first.min() == 0 and image_first.max() == 500
    assert abs(image_first.float().mean().item() - 250) < 5
    assert caption_first.max() == 999 and (caption_first > 500).float().mean() > 0.45
    assert abs(caption_first.float().mean().item() - 499.5) < 10


def test_noise_images_draws_are_deterministic_and_cfg_dropout_has_its_rate():
    cfg = DiffusionConfig(caption_dropout=0.1)
    rows = [[[TextSegment([5]), ImageSegment(torch.zeros(1, 1, 1), i % 5 != 0)] for i in range(40)]]
    batch = pack_documents(rows, 40 * 4, 1, (1, 1, 1), SPECIAL)
    schedule = CosineSchedule.create(cfg.train_timesteps)
    a, eps_a = noise_images(batch, schedule, cfg, torch.Generator().manual_seed(3))
    b, eps_b = noise_images(batch, schedule, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(a.latents, b.latents) and torch.equal(eps_a, eps_b)
    assert torch.equal(a.timesteps, b.timesteps) and torch.equal(a.unconditional, b.unconditional)
    # The limit applies per image: image-first ones (every 5th) stay at t ≤ 500.
    assert bool((a.timesteps[~a.caption_first] <= 500).all())
    # Clean latents of zero: x_t is exactly sqrt(1-ᾱ_t)·ε.
    abar = schedule.alphas_cumprod[a.timesteps].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(a.latents, (1 - abar).sqrt() * eps_a)
    # Dropout rate over many draws: within 4σ of 0.1.
    generator = torch.Generator().manual_seed(4)
    drops = torch.cat(
        [noise_images(batch, schedule, cfg, generator)[0].unconditional for _ in range(500)]
    )
    sigma = math.sqrt(0.1 * 0.9 / drops.numel())
    assert abs(drops.float().mean().item() - 0.1) < 4 * sigma


def uneven_micro_batches():
    """A text-only micro-batch with 9 trained tokens, and one with 6 and 3 images."""
    image = ImageSegment(torch.ones(1, 1, 2))
    text = [
        [[TextSegment([5, 6, 7, 8, 9])]],
        [[TextSegment([5, 6, 7])], [TextSegment([8, 9, 10, 11])]],
    ]
    images = [
        [[TextSegment([7, 8]), image, TextSegment([9])], [image]],
        [[ImageSegment(torch.ones(1, 1, 2), caption_first=False), TextSegment([3, 4, 5])]],
    ]
    generator = torch.Generator().manual_seed(2)
    out = []
    for rows in (text, images):
        batch = pack_documents(rows, 16, 2, (1, 1, 2), SPECIAL)
        output = SimpleNamespace(
            token_losses=torch.rand(batch.tokens.shape, generator=generator).requires_grad_(),
            predicted_noise=torch.randn(batch.latents.shape, generator=generator).requires_grad_(),
        )
        out.append(
            (MicroBatch(batch, torch.randn(batch.latents.shape, generator=generator)), output)
        )
    return out


def test_micro_batch_shares_add_up_to_the_global_batch_means(megatron_world):
    """L_LM is the mean over every trained token of the global batch, L_DDPM over every
    image, however they fall into micro-batches: not a mean of per-micro-batch means."""
    weight = 5.0
    pairs = uneven_micro_batches()
    global_batch = GlobalBatch.of([micro for micro, _ in pairs])
    assert (global_batch.num_tokens, global_batch.num_images, global_batch.averaged_over) == (
        9 + 6,
        3,
        2,
    )
    totals, reports = zip(
        *(
            global_batch.loss(micro, micro.batch.lm_targets()[1], weight, output)
            for micro, output in pairs
        )
    )
    # What the engines train: each micro-batch's loss averaged over micro-batches and DP ranks.
    trained = sum(totals) / global_batch.averaged_over
    inputs = [t for _, output in pairs for t in (output.token_losses, output.predicted_noise)]

    # Brute force over the concatenated batch.
    token_losses = torch.cat([o.token_losses[m.batch.lm_targets()[1]] for m, o in pairs])
    per_image = [
        (p - e).pow(2).mean() for m, o in pairs for p, e in zip(o.predicted_noise, m.noise)
    ]
    lm, diffusion = token_losses.mean(), torch.stack(per_image).mean()
    expected = lm + weight * diffusion
    assert trained.item() == pytest.approx(expected.item(), rel=1e-6)
    summed = batch_losses(list(reports))
    for name, ours, value in zip(LossTerms.KEYS, summed.values(), (expected, lm, diffusion)):
        assert ours == pytest.approx(value.item(), rel=1e-6), name
    for ours, theirs in zip(
        torch.autograd.grad(trained, inputs, materialize_grads=True),
        torch.autograd.grad(expected, inputs, materialize_grads=True),
    ):
        torch.testing.assert_close(ours, theirs)


def test_global_batch_without_images_or_text_tokens(megatron_world):
    """A global batch with no image (or no trained token): that part is 0, not NaN, and
    the patch-out layer's output stays in the graph."""
    (text, output), _ = uneven_micro_batches()
    total, report = GlobalBatch.of([text]).loss(text, text.batch.lm_targets()[1], 5.0, output)
    total.backward()
    assert float(report.diffusion) == 0.0 and float(report.lm) > 0
    assert output.predicted_noise.shape[0] == 0 and output.predicted_noise.grad is not None

    images = pack_documents([[[ImageSegment(torch.ones(1, 1, 2))]]], 8, 2, (1, 1, 2), SPECIAL)
    micro = MicroBatch(images, torch.zeros(1, 1, 1, 2))
    lm_mask = images.lm_targets()[1]
    output = SimpleNamespace(token_losses=torch.ones(1, 8), predicted_noise=torch.ones(1, 1, 1, 2))
    _, report = GlobalBatch.of([micro]).loss(micro, lm_mask, 5.0, output)
    assert not lm_mask.any() and float(report.lm) == 0.0
    assert float(report.diffusion) == 1.0


def test_min_snr_weights_by_hand():
    """min(SNR, γ)/SNR from ᾱ = cos²-schedule values: nearly clean images weigh little, noisy
    ones 1; uniform weighting adds no weights at all."""
    schedule = CosineSchedule.create(1000)
    timesteps = torch.tensor([0, 100, 500, 900, 999])
    assert loss_weights(timesteps, schedule, DiffusionConfig()) is None
    weights = loss_weights(
        timesteps, schedule, DiffusionConfig(loss_weighting="min_snr", min_snr_gamma=5.0)
    )
    for t, w in zip(timesteps.tolist(), weights.tolist(), strict=True):
        abar = schedule.alphas_cumprod[t].item()
        snr = abar / (1 - abar)
        assert w == pytest.approx(min(snr, 5.0) / snr, rel=1e-6)
    assert weights[0] < 1e-3 and weights[-2:].tolist() == [1.0, 1.0]


def test_image_weights_scale_each_images_squared_error():
    predicted = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    noise = torch.zeros_like(predicted)
    weights = torch.tensor([0.5, 1.0, 0.0])
    loss = transfusion_loss(
        torch.zeros(1, 1),
        torch.zeros(1, 1, dtype=torch.bool),
        predicted,
        noise,
        5.0,
        image_weights=weights,
    )
    per_image = predicted.pow(2).flatten(1).mean(1)
    torch.testing.assert_close(loss.diffusion, (per_image * weights).sum() / 3)


def test_micro_batch_draw_carries_the_configured_weights():
    batch = pack_documents(
        [[[TextSegment([7]), ImageSegment(torch.ones(1, 1, 2))]] * 1] * 4, 5, 2, (1, 1, 2), SPECIAL
    )
    schedule = CosineSchedule.create(1000)
    cfg = DiffusionConfig(loss_weighting="min_snr")
    micro = MicroBatch.draw(
        batch, schedule, cfg, torch.Generator().manual_seed(0), torch.device("cpu")
    )
    torch.testing.assert_close(
        micro.image_weights, loss_weights(micro.batch.timesteps, schedule, cfg)
    )
    again = MicroBatch.draw(
        batch, schedule, DiffusionConfig(), torch.Generator().manual_seed(0), torch.device("cpu")
    )
    assert again.image_weights is None and torch.equal(again.noise, micro.noise)
