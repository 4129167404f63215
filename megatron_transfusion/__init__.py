"""Transfusion-style multimodal pretraining on Megatron-Core."""

import logging
import warnings

# Expected on machines without Transformer Engine/Apex/CUDA: Megatron-Core falls back to
# plain torch ops, which is the documented CPU path. Keep the console for real problems.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
