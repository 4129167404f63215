"""Streaming mixed-modality data: prepared MDS datasets -> mixed, ordered, packed batches."""

from megatron_transfusion.data.loader import MixedModalityLoader
from megatron_transfusion.data.mixture import MixtureSampler
from megatron_transfusion.data.source import CorruptShardError, PreparedDataset

__all__ = ["CorruptShardError", "MixedModalityLoader", "MixtureSampler", "PreparedDataset"]
