"""model.fuse_elementwise: the compiled RMSNorm, SwiGLU and RoPE give the eager model's
outputs and gradients, and a training process compiles them once, not every step."""

import pytest
import torch
from torch._dynamo.utils import counters

from megatron_transfusion.config import load_config
from megatron_transfusion.parallel import seed_everything

# Grouped keys (2 groups for 4 heads): RoPE runs on queries and keys of different shapes.
OVERRIDES = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.vocab_size=100",
    "model.make_vocab_size_divisible_by=4",
    "data.seq_length=64",
    "data.micro_batch_size=2",
    "data.global_batch_tokens=128",
]


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def build(fused: bool, megatron_world):
    from megatron_transfusion.model import build_model

    cfg = load_config("tiny", OVERRIDES + [f"model.fuse_elementwise={str(fused).lower()}"])
    seed_everything(0)
    (model,) = build_model(cfg, megatron_world)
    return model, cfg


def batch(cfg, seed: int):
    from megatron_transfusion.diffusion import CosineSchedule, noise_images
    from megatron_transfusion.synthetic import random_batch

    generator = torch.Generator().manual_seed(seed)
    packed = random_batch(generator, cfg.model, cfg.data.micro_batch_size, cfg.data.seq_length)
    return noise_images(packed, CosineSchedule.create(), cfg.diffusion, generator)


def step(model, cfg, noised, noise):
    """Forward and backward of the training loss; outputs and gradients."""
    from megatron_transfusion.loss import transfusion_loss

    model.zero_grad(set_to_none=True)
    labels, lm_mask = noised.lm_targets()
    out = model(noised, labels)
    loss = transfusion_loss(
        out.token_losses, lm_mask, out.predicted_noise, noise, cfg.diffusion.loss_weight
    )
    loss.total.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return {
        "token_losses": out.token_losses.detach(),
        "predicted_noise": out.predicted_noise.detach(),
    }, grads


def test_fused_model_equals_eager_forward_and_gradients(megatron_world):
    torch._dynamo.reset()  # this test counts graphs from scratch
    results = {}
    for fused in (False, True):
        before = compiled_graphs()
        model, cfg = build(fused, megatron_world)
        noised, noise = batch(cfg, seed=1)
        outputs, grads = step(model, cfg, noised, noise)
        # The switch really switches: RMSNorm, RoPE, SwiGLU and SwiGLU's backward (Megatron
        # compiles it apart) are one graph each, shared by all layers; none when not fused.
        assert compiled_graphs() - before == (4 if fused else 0)
        with torch.no_grad():  # inference (eager but Megatron's SwiGLU), and the logits path
            outputs["logits"] = model(noised).logits
        results[fused] = outputs, grads
    (eager_out, eager_grads), (fused_out, fused_grads) = results[False], results[True]
    for key, value in eager_out.items():
        torch.testing.assert_close(fused_out[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert eager_grads.keys() == fused_grads.keys()
    for name, grad in eager_grads.items():
        assert grad.abs().max() > 0, f"{name} got no gradient"
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_fused_model_compiles_once_per_shape(megatron_world):
    model, cfg = build(True, megatron_world)
    step(model, cfg, *batch(cfg, seed=2))
    compiled = compiled_graphs()
    for seed in (3, 4):  # new batches of the same shape: new images, documents and masks
        step(model, cfg, *batch(cfg, seed))
    assert compiled_graphs() == compiled, "a training step recompiled"


@pytest.mark.parametrize("rotary", [True, False])
def test_compiled_rotary_returns_batch_major_memory(rotary):
    """The attention kernel gets [b, s, heads, d] memory from the compiled path as from
    eager (SDPA's CPU kernel is slower on Megatron's [s, b, ...] order)."""
    from kernels.attention import rotary_batch_major
    from kernels.elementwise import fusable

    s, b, heads, d = 12, 3, 2, 8
    qkv = torch.randn(s, b, heads, 3 * d)  # Megatron's fused projection, split into views
    q, k, v = qkv.split(d, dim=-1)
    angles = torch.randn(s, b, 1, d)
    cos_sin = (angles.cos(), angles.sin()) if rotary else None
    eager = rotary_batch_major(q, k, v, cos_sin)
    torch._dynamo.reset()
    before = compiled_graphs()
    compiled = fusable(rotary_batch_major, True)(q, k, v, cos_sin)
    assert compiled_graphs() == before + 1
    for e, c in zip(eager, compiled):
        assert e.transpose(0, 1).is_contiguous() and c.transpose(0, 1).is_contiguous()
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6)
