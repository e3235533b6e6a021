"""Stage 3, the fine-tuning engine: what every granularity shares. The unit masks (:mod:`.units`), the pruning
methods behind :data:`~.methods.METHODS`, the pure schedules, the training loop (:mod:`.training`),
checkpoints, data parallelism, and the learning-rate probe (:mod:`.lr_probe`). It never asks whether a unit is
a block or a channel family: it sees masked units through :class:`~.units.Masked`."""
