"""Stage 5, training: the run (set up, epochs, checkpoints, finish) and what listens to it
(progress, checkpointing, tracking), several seeds, sweeps, torchrun."""
