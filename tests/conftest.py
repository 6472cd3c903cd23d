"""Session set-up shared by every test module."""

import torch

# One intra-op thread in the tests' own process, as in the spawned ranks (tests/dist_helper.py) and
# torchrun's workers: the tiny models' ops gain nothing from a second thread, and OpenMP's
# spinning second thread takes a core from the ranks and jobs the tests run next to it (on a busy
# 2-core machine a world-1 run burned 30x the CPU time with 2 threads).
torch.set_num_threads(1)
