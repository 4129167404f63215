"""Under torchrun: load a checkpoint at TP = world size and generate for fixed prompts
(text -> image, then text after it; captioning of a prompt image). Rank 0 saves every
token and latent, so layouts and checkpoint formats can be compared exactly."""

import argparse
import json
import os

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from megatron_transfusion.batch import ImageSegment, TextSegment
from megatron_transfusion.inference.generate import Generator, SamplingConfig
from megatron_transfusion.inference.load import load_for_inference, load_tokenizer
from megatron_transfusion.parallel import destroy_distributed


def prompts(special, latent_shape):
    image = torch.randn(latent_shape, generator=torch.Generator().manual_seed(7))
    return [
        [TextSegment([special.bos, 40, 41, 42])],
        [TextSegment([special.bos, 50])],
        [TextSegment([special.bos]), ImageSegment(image), TextSegment([60])],
    ]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    args = parser.parse_args()
    loaded = load_for_inference(
        args.checkpoint, tensor_parallel=int(os.environ.get("WORLD_SIZE", 1))
    )
    cfg = loaded.cfg
    special = load_tokenizer(cfg).special
    sampling = SamplingConfig(
        max_new_tokens=3, diffusion_steps=4, guidance_scale=3.0, temperature=0.7, top_p=0.9
    )
    generator = Generator(loaded.model, cfg, special, sampling)
    shape = (cfg.model.latent_channels, cfg.model.latent_size, cfg.model.latent_size)
    results = generator.generate(prompts(special, shape), force_image=True)
    if dist.get_rank() == 0:
        tensors, texts = {}, []
        for r, result in enumerate(results):
            for s, segment in enumerate(result):
                if isinstance(segment, ImageSegment):
                    tensors[f"row{r}_segment{s}"] = segment.latent.float().cpu().contiguous()
                else:
                    texts.append([r, s, segment.tokens])
        save_file(tensors, args.out, metadata={"texts": json.dumps(texts)})
    destroy_distributed()


if __name__ == "__main__":
    main()
