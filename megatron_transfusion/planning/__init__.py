"""Layout planner: how to lay a config out over a cluster, and what that will cost.

For a config (model, sequence length, global batch), a cluster and a GPU count it lists
the TP/SP/PP/DP/ZeRO/recompute layouts this project can run, predicts memory per GPU and
step time with the explicit model below, and ranks the layouts that fit the memory with
a margin by predicted throughput. ``mtf-plan`` prints the ranking; ``mtf-plan --check``
evaluates the config's own ``parallel:`` section, in four lines, for the Slurm dry run.

Modules, lowest first: ``cluster`` (the hardware), ``layouts`` (what can run), ``memory``
and ``timing`` (the two models, documented there), ``ranking`` (predictions, best first),
``report`` (text) and ``cli`` (``mtf-plan``; nothing imports it).
"""
