import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

# the CI machine has 2 cores: one thread per test process is faster than two fighting over them
torch.set_num_threads(1)
