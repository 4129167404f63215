"""The Megatron-Core TransfusionModel in one process: the mask is really used, losses
are what they claim, and the sharded state dict covers every parameter."""

import pytest
import torch
import torch.nn.functional as F

from megatron_transfusion.batch import ImageSegment, SpecialTokens, TextSegment, pack_documents
from megatron_transfusion.config import load_config
from megatron_transfusion.parallel import seed_everything

SPECIAL = SpecialTokens(pad=0, bos=3, eos=4, boi=1, eoi=2)
OVERRIDES = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.vocab_size=100",
    "model.make_vocab_size_divisible_by=4",
    "data.seq_length=64",
    "data.micro_batch_size=1",
    "data.global_batch_tokens=64",
]


@pytest.fixture(scope="module", params=["linear", "unet"])
def model_and_cfg(request, megatron_world):
    from megatron_transfusion.model import build_model

    overrides = OVERRIDES + [f"model.patch_layer={request.param}", "model.unet_channels=[16]"]
    cfg = load_config("tiny", overrides)
    seed_everything(0)
    (model,) = build_model(cfg, megatron_world)
    model.eval()
    return model, cfg


def latent(cfg, seed):
    m = cfg.model
    return torch.randn(
        (m.latent_channels, m.latent_size, m.latent_size),
        generator=torch.Generator().manual_seed(seed),
    )


def layout(cfg, caption=(5, 6, 7), tail=(8, 9), second_doc=(10, 11, 12), image_seed=0):
    """[caption BOI image EOI tail] [second document]"""
    rows = [
        [
            [
                TextSegment(list(caption)),
                ImageSegment(latent(cfg, image_seed)),
                TextSegment(list(tail)),
            ],
            [TextSegment(list(second_doc))],
        ]
    ]
    m = cfg.model
    shape = (m.latent_channels, m.latent_size, m.latent_size)
    return pack_documents(rows, cfg.data.seq_length, m.patches_per_image, shape, SPECIAL)


@torch.no_grad()
def run(model, batch):
    out = model(batch)
    return out.logits[:, 0], out.predicted_noise[0]  # [s, vocab], [C, H, W]


def test_image_attention_is_bidirectional_and_text_is_causal(model_and_cfg):
    model, cfg = model_and_cfg
    p = cfg.model.patches_per_image
    base = layout(cfg)
    logits, _ = run(model, base)
    # Change only the LAST patch of the image: with a causal mask the first patch could
    # not notice; under the Transfusion mask it must.
    latents = base.latents.clone()
    latents[0, :, -1, -1] += 3.0
    changed_logits, _ = run(model, base.replace(latents=latents))
    first_patch = 4  # caption (3) + BOI
    assert (changed_logits[first_patch] - logits[first_patch]).abs().max() > 1e-4
    # Text before the image (and BOI) cannot see it.
    assert torch.equal(changed_logits[:first_patch], logits[:first_patch])
    # Text after the image sees it...
    tail = first_patch + p + 1
    assert (changed_logits[tail] - logits[tail]).abs().max() > 1e-4
    # ...but never anything later: changing the last tail token leaves the first alone.
    later = layout(cfg, tail=(8, 50))
    later_logits, _ = run(model, later)
    assert torch.equal(later_logits[: tail + 1], logits[: tail + 1])
    assert (later_logits[tail + 1] - logits[tail + 1]).abs().max() > 1e-4


def test_documents_are_isolated(model_and_cfg):
    model, cfg = model_and_cfg
    logits, _ = run(model, layout(cfg))
    other, _ = run(model, layout(cfg, caption=(40, 41, 42), image_seed=1))
    start = 3 + cfg.model.patches_per_image + 2 + 2
    assert torch.equal(other[start : start + 3], logits[start : start + 3])


def test_unconditional_image_ignores_its_caption(model_and_cfg):
    model, cfg = model_and_cfg
    a, b = layout(cfg), layout(cfg, caption=(60, 61, 62))
    _, noise_a = run(model, a)
    _, noise_b = run(model, b)
    assert (noise_a - noise_b).abs().max() > 1e-4, "a conditioned image depends on its caption"
    flag = torch.tensor([True])
    _, free_a = run(model, a.replace(unconditional=flag))
    _, free_b = run(model, b.replace(unconditional=flag))
    torch.testing.assert_close(free_a, free_b, rtol=0, atol=1e-6)


def test_token_losses_equal_cross_entropy_of_logits(model_and_cfg):
    """Where a position has an LM loss; elsewhere (images, BOI, document ends, padding)
    the LM head does not run and the loss is 0."""
    model, cfg = model_and_cfg
    batch = layout(cfg)
    labels, trained = batch.lm_targets()
    with torch.no_grad():
        losses = model(batch, labels).token_losses[0]
        logits, _ = run(model, batch)
    expected = F.cross_entropy(logits, labels[0], reduction="none")
    trained = trained[0]
    assert 0 < trained.sum() < len(trained)
    torch.testing.assert_close(losses[trained], expected[trained], rtol=1e-5, atol=1e-5)
    assert torch.equal(losses[~trained], torch.zeros_like(losses[~trained]))


def test_sharded_state_dict_covers_every_parameter(model_and_cfg):
    from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedTensor

    model, cfg = model_and_cfg
    sharded = model.sharded_state_dict()
    for name, _ in model.named_parameters():
        assert isinstance(sharded.get(name), ShardedBase), f"{name} missing from sharded_state_dict"
    tensors = {k: v for k, v in sharded.items() if isinstance(v, ShardedTensor)}
    # Patch layers are replicated on every TP rank: no TP axis, full global shape.
    patch_keys = [k for k in tensors if k.startswith(("patch_in.", "patch_out."))]
    assert patch_keys
    for key in patch_keys:
        assert tensors[key].global_shape == tensors[key].local_shape
        assert set(tensors[key].axis_fragmentations) == {1}
    # The LM head is stored at its full (padded) vocabulary size, split on axis 0 by TP.
    assert tensors["output_layer.weight"].global_shape[0] == cfg.model.padded_vocab_size


def test_seed_makes_initialisation_reproducible(megatron_world):
    from megatron_transfusion.model import build_model

    cfg = load_config("tiny", OVERRIDES)
    seed_everything(5)
    (a,) = build_model(cfg, megatron_world)
    seed_everything(5)
    (b,) = build_model(cfg, megatron_world)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name


@pytest.mark.parametrize("backend", ["flex", "flash"])
def test_flex_backend_model_matches_sdpa_backend(model_and_cfg, megatron_world, backend):
    """Same weights, FlexAttention BlockMask (forward, CPU) or the flash run split (SDPA per
    run on CPU) vs dense-mask SDPA."""
    from megatron_transfusion.model import build_model

    model, cfg = model_and_cfg
    flex_cfg = load_config(
        "tiny",
        OVERRIDES
        + [
            f"model.patch_layer={cfg.model.patch_layer}",
            "model.unet_channels=[16]",
            f"model.attention_backend={backend}",
            "model.flex_block_size=16",
        ],
    )
    (flex_model,) = build_model(flex_cfg, megatron_world)
    flex_model.load_state_dict(model.state_dict())
    flex_model.eval()
    batch = layout(cfg).replace(unconditional=torch.tensor([True]))
    logits, noise = run(model, batch)
    flex_logits, flex_noise = run(flex_model, batch)
    torch.testing.assert_close(flex_logits, logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(flex_noise, noise, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_recompute_gives_identical_gradients(megatron_world, mode, monkeypatch):
    import megatron_transfusion.model.layer_spec as layer_spec
    from megatron_transfusion.diffusion import CosineSchedule, noise_images
    from megatron_transfusion.model import build_model
    from megatron_transfusion.synthetic import random_batch
    from megatron_transfusion.training.step import MicroBatch, forward_backward

    grads, calls = {}, {}
    original = layer_spec.attend
    for recompute in ("none", mode):
        counter = []
        # The patched attend runs only within this iteration, so `counter` is this one's.
        monkeypatch.setattr(
            layer_spec,
            "attend",
            lambda *a, **k: counter.append(1) or original(*a, **k),  # noqa: B023
        )
        cfg = load_config("tiny", OVERRIDES + [f"parallel.recompute={recompute}"])
        seed_everything(3)
        (model,) = build_model(cfg, megatron_world)
        generator = torch.Generator().manual_seed(0)
        batch = random_batch(generator, cfg.model, 2, cfg.data.seq_length)
        micro = MicroBatch(*noise_images(batch, CosineSchedule.create(), cfg.diffusion, generator))
        forward_backward([model], [micro], cfg.diffusion.loss_weight)
        grads[recompute] = {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        }
        calls[recompute] = len(counter)
    assert calls[mode] == 2 * calls["none"] == 2 * cfg.model.num_layers, (
        "attention re-ran in backward"
    )
    assert grads["none"].keys() == grads[mode].keys() and grads["none"]
    for name, grad in grads["none"].items():
        torch.testing.assert_close(grads[mode][name], grad, rtol=0, atol=1e-6, msg=name)


def test_text_only_batch_still_reaches_every_parameter(model_and_cfg):
    """ZeRO-2/3 reduce gradients from hooks: all ranks must touch the same parameters,
    also when a rank's micro-batch happens to hold no image."""
    from megatron_transfusion.loss import transfusion_loss

    model, cfg = model_and_cfg
    rows = [[[TextSegment([5, 6, 7, 8])]]]
    m = cfg.model
    batch = pack_documents(
        rows,
        cfg.data.seq_length,
        m.patches_per_image,
        (m.latent_channels, m.latent_size, m.latent_size),
        SPECIAL,
    )
    labels, mask = batch.lm_targets()
    model.zero_grad(set_to_none=True)
    out = model(batch, labels)
    loss = transfusion_loss(
        out.token_losses, mask, out.predicted_noise, out.predicted_noise.detach(), 5.0
    )
    loss.total.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    assert loss.diffusion.item() == 0.0
