"""Ground floor: the training plumbing every training loop shares (distill, finetune, teacher training).

``runtime`` (device, torchrun / DDP, autocast, seeds), ``checkpoint`` (atomic save with RNG state, safe load),
``metrics`` (metrics.jsonl + TensorBoard), ``sampler`` (resumable step-indexed batches), ``backbone`` (the one
timm backbone wrapper, in timm's parameter names) and ``blocks`` (conv-BN-ReLU, pyramid pooling).
"""
