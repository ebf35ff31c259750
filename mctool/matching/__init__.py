"""The gradient engine of distillation and its memory model.

loss (the trajectory-matching loss and its gradients in the three `--grad` modes), secondorder
(which second-order step runs), fastgrad (the hand-written ConvNet sweep), microbatch (chunks
that sum to the whole batch), memory (peak memory of an iteration, free memory, the micro-batch
that fits).
"""
