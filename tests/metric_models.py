"""Random stand-ins for the weights FID and CLIP score read, built locally in the real files'
layout (so the code that loads them loads the real ones alike); nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# CLIPImageProcessor's normalisation (OpenAI CLIP's), for references computed by hand.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def random_fid_inception(path: Path) -> Path:
    """The tensors of pt_inception-2015-12-05-6726825d.pth, at random: torchvision's
    Inception-v3 with the TF graph's 1008-class head and no auxiliary head has the same
    state-dict keys (torch-fidelity's network loads it strictly). BatchNorm statistics come
    from one train-mode batch, as trained weights would have them: the default 0/1 would
    blow the activations up over 94 layers. The head is scaled down to a trained one's
    logits (tens, not thousands), whose softmax Inception score takes in float32."""
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    model = inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=True)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # the batch's own statistics
    with torch.no_grad():
        model.train()(torch.rand(4, 3, 299, 299) * 2 - 1)  # TF-Inception's input range
        model.fc.weight *= 0.01
    torch.save(model.state_dict(), path)
    return path


def tiny_clip(directory: Path) -> Path:
    """A random CLIP with its tokenizer and image processor saved as a Hugging Face
    directory, as openai/clip-vit-* are; 32-px images, character-level BPE."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    directory.mkdir(parents=True, exist_ok=True)
    vocab = {}
    for token in [*"abcdefghijklmnopqrstuvwxyz", "<|startoftext|>", "<|endoftext|>"]:
        vocab[token] = len(vocab)
        vocab[f"{token}</w>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    images = CLIPImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(directory)
    end = vocab["<|endoftext|>"]
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=32,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=end,
            pad_token_id=end,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(directory)
    return directory
