"""Two processes over gloo: as DP=2 they get disjoint halves of the global batch; as one
TP=2 replica they get identical batches. Fails (non-zero exit) on any mismatch."""

import sys
from pathlib import Path

import torch.distributed as dist
from megatron.core import parallel_state

from megatron_transfusion import platform
from megatron_transfusion.data import MixedModalityLoader
from megatron_transfusion.parallel import destroy_distributed, init_distributed
from tests.test_loader import config, rows_of


def batches(cfg, steps=3):
    loader = MixedModalityLoader(
        cfg, parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    )
    return [rows_of(loader.next_step()) for _ in range(steps)]


def gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def main():
    root = Path(sys.argv[1])
    plat = platform.activate()
    dp_cfg = config(root)
    init_distributed(dp_cfg.parallel, plat)
    mine = gather(batches(dp_cfg))
    reference = MixedModalityLoader(dp_cfg)
    for step in range(3):
        whole = rows_of(reference.next_step())
        a, b = mine[0][step], mine[1][step]
        assert not set(a) & set(b), "DP ranks must read disjoint rows"
        assert sorted(a + b) == sorted(whole), "DP ranks together read the global batch"
    parallel_state.destroy_model_parallel()
    tp_cfg = config(root, "parallel.tensor_parallel=2", "model.num_attention_heads=4")
    init_distributed(tp_cfg.parallel, plat)
    mine = gather(batches(tp_cfg))
    assert mine[0] == mine[1], "TP ranks of one replica must read identical batches"
    destroy_distributed()


if __name__ == "__main__":
    main()
