"""Unit tier: tiny tensors, so one intra-op thread is fastest and immune to OpenMP spin-waiting when the
machine is busy with other work (two threads on a loaded 2-core box made the tier several times slower)."""
import torch

torch.set_num_threads(1)
