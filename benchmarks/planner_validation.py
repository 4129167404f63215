"""The layout planner's time model against published H100 throughput, with the error.

    python -m benchmarks.planner_validation

(a) Megatron-Core, GPT-3 175B strong scaling on H100 (Megatron-LM README): 1152 sequences
    of 2048 tokens per step, 47% MFU on 96 GPUs falling to 42% on 4608. Layout TP=4, PP=8
    (the Megatron-Core documentation's configuration for it), micro-batch 1, distributed
    optimizer. The planner does not know the virtual-pipeline size used; each point takes
    the best it finds. The MLP is given as SwiGLU of width 8h/3, which has the FLOPs and
    parameters of GPT-3's 4h GeLU MLP; vocabulary 51,200 (GPT-2's, padded). The planner
    models this project's engine: fp32 gradient reduce-scatter and no overlap of the
    data-parallel or pipeline sends with compute, where Megatron-LM reduces in bf16 and
    overlaps both; that shows at 4608 GPUs, where communication is no longer small.
(b) torchtitan, Llama-3 8B on 8×H100, FSDP, bf16, no compile: 5,762 tokens/s/GPU
    (torchtitan paper, Liang et al. 2024), as ZeRO-3 over DP=8, sequence 8192, local batch 1.

The planner's one fitted constant, ``compute_efficiency`` of the h100-80gb preset, was
fitted to (b), so (b) is an in-sample check; (a) is out of sample. The script also
prints the efficiency each figure alone would imply. No image tokens in either.
"""

from __future__ import annotations

import math

from megatron_transfusion.config import load_config
from megatron_transfusion.planning.cluster import CLUSTERS
from megatron_transfusion.planning.layouts import Layout
from megatron_transfusion.planning.ranking import predict

H100 = CLUSTERS["h100-80gb"]
GPT3_175B = [
    "model.num_layers=96",
    "model.hidden_size=12288",
    "model.num_attention_heads=96",
    "model.ffn_hidden_size=32768",
    "model.vocab_size=51200",
    "model.max_sequence_length=2048",
    "data.seq_length=2048",
    f"data.global_batch_tokens={1152 * 2048}",
]
LLAMA3_8B = [
    "model.num_layers=32",
    "model.hidden_size=4096",
    "model.num_attention_heads=32",
    "model.num_query_groups=8",
    "model.ffn_hidden_size=14336",
    "model.vocab_size=128256",
    "model.max_sequence_length=8192",
    "data.seq_length=8192",
    f"data.global_batch_tokens={8 * 8192}",
]
# Text only: the planner reads the sources' kinds and weights, never their paths.
NO_IMAGES = ["model.patch_layer=linear", "data.sources=[{kind: text, path: unread}]"]


def megatron_gpt3(gpus: int):
    """Best prediction over virtual-pipeline sizes for TP=4, PP=8 on ``gpus`` H100s."""
    cfg = load_config(None, GPT3_175B + NO_IMAGES)
    layers_per_stage = cfg.model.num_layers // 8
    options = [
        Layout(4, 8, gpus // 32, vp, 1, "none", "megatron", 1)
        for vp in [None] + [v for v in range(2, layers_per_stage + 1) if layers_per_stage % v == 0]
    ]
    return max((predict(cfg, H100, layout, 0.0) for layout in options), key=lambda p: p.mfu)


def torchtitan_llama3():
    cfg = load_config(None, LLAMA3_8B + NO_IMAGES)
    return predict(cfg, H100, Layout(1, 1, 8, None, 1, "none", "deepspeed", 3), 0.0)


def implied_efficiency(prediction, predicted_over_published: float) -> float:
    """The compute efficiency that would make the prediction match, holding communication
    fixed (compute and bubble scale as 1/efficiency)."""
    t = prediction.time
    scaling = t.compute + t.bubble
    left = t.total * predicted_over_published - (t.total - scaling)  # time left for compute
    return H100.compute_efficiency * scaling / left if left > 0 else math.inf


def main() -> None:
    print(
        f"h100-80gb: peak {H100.peak_flops / 1e12:.0f} TFLOP/s, "
        f"compute efficiency {H100.compute_efficiency}"
    )
    rows = []
    for gpus, published in ((96, 0.47), (4608, 0.42)):
        p = megatron_gpt3(gpus)
        rows.append(
            (
                f"(a) Megatron-Core GPT-3 175B, {gpus} GPUs, {p.layout.describe()}",
                "MFU",
                published,
                p.mfu,
                p,
            )
        )
    p = torchtitan_llama3()
    rows.append(
        (
            f"(b) torchtitan Llama-3 8B, 8 GPUs, {p.layout.describe()}",
            "tokens/s/GPU",
            5762.0,
            p.tokens_per_second_per_gpu,
            p,
        )
    )
    for name, unit, published, predicted, p in rows:
        error = predicted / published - 1
        shown = (lambda x: f"{x:.1%}") if unit == "MFU" else (lambda x: f"{x:,.0f}")
        implied = implied_efficiency(p, predicted / published)
        implied = f"{implied:.2f}" if implied <= 1 else "none (communication alone is longer)"
        print(
            f"{name}\n    {unit}: published {shown(published)}, predicted {shown(predicted)}, "
            f"error {error:+.1%} | MFU {p.mfu:.1%}, step {p.time.total:.2f} s "
            f"(compute {p.time.compute:.2f}, "
            f"bubble {p.time.bubble:.2f}, TP {p.time.tensor_parallel:.2f}, "
            f"PP p2p {p.time.pipeline_p2p:.2f}, "
            f"DP {p.time.data_parallel:.2f}) | efficiency that would match: "
            f"{implied}"
        )
    drop_published = 0.42 / 0.47
    drop_predicted = rows[1][3] / rows[0][3]
    print(
        f"(a) strong scaling 96 -> 4608 GPUs, MFU ratio (independent of the efficiency): published "
        f"{drop_published:.3f}, predicted {drop_predicted:.3f}, "
        f"error {drop_predicted / drop_published - 1:+.1%}"
    )


if __name__ == "__main__":
    main()
