"""``python -m megatron_transfusion.train``: the entry point torchrun and srun launch."""

from megatron_transfusion.cli import train_main

if __name__ == "__main__":
    train_main()
