"""The reverse process's timestep spacing: an ε-model's small errors must stay small.

An oracle that knows x0 returns the true ε; real models are off by a little. The sampler must
not turn a 1% ε error into a large step (it did from t = T-1, where the cosine schedule caps β
and ᾱ ≈ 2.4e-9), and a chain fed the Bayes-optimal ε of a known data distribution, off by a
little, must still draw that distribution."""

import pytest
import torch

from megatron_transfusion.batch import SpecialTokens
from megatron_transfusion.config import load_config
from megatron_transfusion.diffusion.sampler import ReverseProcess
from megatron_transfusion.diffusion.schedule import CosineSchedule
from megatron_transfusion.inference.generate import Generator, SamplingConfig

SCHEDULE = CosineSchedule.create(1000)
X0 = torch.randn(8, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
ERROR = 0.01  # RMS of the ε error


def oracle_eps(x_t, t, schedule=SCHEDULE):
    abar = schedule.alphas_cumprod[t]
    return (x_t - abar.sqrt() * X0) / (1 - abar).sqrt()


def first_step_gain(process: ReverseProcess) -> float:
    """RMS change of x_{t1} caused by an ε error of RMS 1 at the chain's first step t0 → t1."""
    t0, t1 = process.timesteps()[:2]
    g = torch.Generator().manual_seed(1)
    abar = SCHEDULE.alphas_cumprod[t0]
    x_t = abar.sqrt() * X0 + (1 - abar).sqrt() * torch.randn(
        X0.shape, generator=g, dtype=torch.float64
    )
    noise = torch.randn(X0.shape, generator=g, dtype=torch.float64)
    error = torch.randn(X0.shape, generator=g, dtype=torch.float64) * ERROR
    exact = process.step(x_t, oracle_eps(x_t, t0), t0, t1, noise)
    off = process.step(x_t, oracle_eps(x_t, t0) + error, t0, t1, noise)
    return float((off - exact).pow(2).mean().sqrt() / ERROR)


DATA_MEAN, DATA_STD = 0.5, 0.6  # x0 ~ N(mean, std²) elementwise: E[ε | x_t] in closed form


def gaussian_data_eps(x_t, t):
    """The Bayes-optimal ε-prediction for Gaussian data: what a perfectly trained model returns."""
    abar = SCHEDULE.alphas_cumprod[t]
    gain = DATA_STD**2 * abar.sqrt() / (abar * DATA_STD**2 + 1 - abar)
    x0_mean = DATA_MEAN + gain * (x_t - abar.sqrt() * DATA_MEAN)
    return (x_t - abar.sqrt() * x0_mean) / (1 - abar).sqrt()


def sample_with_error(process: ReverseProcess, n: int = 20_000, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    times = process.timesteps()
    x = torch.randn(n, generator=g, dtype=torch.float64)
    for i, t in enumerate(times):
        eps = gaussian_data_eps(x, t) + ERROR * torch.randn(n, generator=g, dtype=torch.float64)
        noise = torch.randn(n, generator=g, dtype=torch.float64)
        x = process.step(x, eps, t, times[i + 1] if i + 1 < len(times) else -1, noise)
    return x


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("steps", [25, 100, 250, 300])
def test_default_spacing_keeps_the_first_step_error_small(sampler, steps):
    assert first_step_gain(ReverseProcess(SCHEDULE, steps, sampler)) < 3
    # The check can fail: from the capped step t = T-1 the same error grows 50-fold or more.
    assert first_step_gain(ReverseProcess(SCHEDULE, steps, sampler, spacing="trailing")) > 50


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("steps", [25, 250])
def test_slightly_wrong_eps_still_draws_the_data_distribution(sampler, steps):
    drawn = sample_with_error(ReverseProcess(SCHEDULE, steps, sampler))
    assert abs(float(drawn.mean()) - DATA_MEAN) < 0.03
    assert 0.88 < float(drawn.std()) / DATA_STD < 1.03  # 25 steps' own discretisation costs ~9%
    if sampler == "ddim":  # deterministic: nothing washes out the blown first step from t = T-1
        from_capped = sample_with_error(
            ReverseProcess(SCHEDULE, steps, sampler, spacing="trailing")
        )
        assert float(from_capped.std()) / DATA_STD > 1.5


@pytest.mark.parametrize("steps", [1, 7, 250, 300, 999, 1000])
def test_leading_spacing_is_evenly_spaced_down_to_zero(steps):
    times = ReverseProcess(SCHEDULE, steps).timesteps()
    assert len(times) == steps and times[-1] == 0
    assert all(a > b for a, b in zip(times, times[1:]))
    assert (
        times[0] == (steps - 1) * 1000 // steps
    )  # leaves out the capped t = 999 unless steps = 1000


def test_the_capped_step_is_the_last_one():
    assert SCHEDULE.last_uncapped_step == 998
    assert ReverseProcess(SCHEDULE, 100, spacing="uncapped").timesteps()[0] == 998


def test_generation_samples_with_the_schedule_the_run_trained():
    cfg = load_config(
        "tiny", ["diffusion.train_timesteps=200", "diffusion.image_first_max_timestep=100"]
    )
    special = SpecialTokens(pad=0, bos=1, eos=2, boi=3, eoi=4)
    generator = Generator(torch.nn.Linear(1, 1), cfg, special, SamplingConfig(diffusion_steps=50))
    assert generator.reverse.schedule.train_timesteps == 200
    torch.testing.assert_close(
        generator.reverse.schedule.alphas_cumprod, CosineSchedule.create(200).alphas_cumprod
    )
    assert max(generator.reverse.timesteps()) < 200
