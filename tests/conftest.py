"""Session-wide test settings."""

import torch

# The CPU test machine has 2 cores shared with other jobs: with intra-op threads, every tiny op
# pays for thread hand-offs under contention (measured ~100x slower); one thread avoids that.
torch.set_num_threads(1)
