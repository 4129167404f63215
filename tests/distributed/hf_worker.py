"""Under torchrun: load Hugging Face Llamas (``hf:DIR``) into the model at the TP/PP
layout given, run a text-only forward through the pipeline by hand, and save the logits,
gathered over TP ranks, from the last stage: the test compares them with transformers'."""

import argparse
import json

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from safetensors.torch import save_file

from checkpoints.huggingface import HFLlama
from checkpoints.import_hf import hf_overrides
from checkpoints.sources import open_weights
from megatron_transfusion import platform
from megatron_transfusion.batch import SpecialTokens, TextSegment, pack_documents
from megatron_transfusion.config import ParallelConfig, load_config
from megatron_transfusion.model import build_model
from megatron_transfusion.parallel import destroy_distributed, init_distributed, seed_everything


def text_batch(tokens: torch.Tensor, cfg):
    m = cfg.model
    return pack_documents(
        [[[TextSegment(row.tolist())]] for row in tokens],
        tokens.shape[1],
        m.patches_per_image,
        (m.latent_channels, m.latent_size, m.latent_size),
        SpecialTokens(0, 1, 2, 3, 4),
    )


def pipeline_logits(model, batch) -> torch.Tensor | None:
    """[b, s, vocab] on the last stage (None elsewhere): stage i receives stage i-1's
    hidden states, as the pipeline schedules hand them over."""
    s, b = batch.tokens.shape[1], batch.tokens.shape[0]
    if not parallel_state.is_pipeline_first_stage():
        hidden = torch.empty(s, b, model.config.hidden_size)
        dist.recv(hidden, parallel_state.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    with torch.no_grad():
        out = model(batch)
    if not parallel_state.is_pipeline_last_stage():
        dist.send(out.contiguous(), parallel_state.get_pipeline_model_parallel_next_rank())
        return None
    logits = tensor_parallel.gather_from_tensor_model_parallel_region(out.logits)
    return logits.transpose(0, 1).contiguous()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("directories", nargs="+")
    args = parser.parse_args()
    layout = [f"parallel.tensor_parallel={args.tp}", f"parallel.pipeline_parallel={args.pp}"]
    plat = platform.activate()
    init_distributed(ParallelConfig(args.tp, args.pp), plat)
    results, fresh = {}, {}
    for i, directory in enumerate(args.directories):
        overrides = [*hf_overrides(HFLlama(directory)), "model.attention_backend=sdpa", *layout]
        cfg = load_config("tiny", overrides)
        seed_everything(0)
        (model,) = build_model(cfg, plat)
        fresh[directory] = open_weights(f"hf:{directory}").load([model], cfg.model)
        tokens = torch.randint(5, 300, (2, 40), generator=torch.Generator().manual_seed(1))
        logits = pipeline_logits(model.eval(), text_batch(tokens, cfg))
        if logits is not None:
            results[f"logits{i}"] = logits
            results[f"tokens{i}"] = tokens
    if results and parallel_state.get_tensor_model_parallel_rank() == 0:
        save_file(results, args.out, metadata={"fresh": json.dumps(fresh)})
    destroy_distributed()


if __name__ == "__main__":
    main()
