"""Training: the forward/backward step over Megatron-Core's pipeline schedules."""
