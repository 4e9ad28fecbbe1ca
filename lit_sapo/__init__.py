"""lit_sapo: Lightning trainer for RL fine-tuning of LMs with SAPO and its smooth-gate family."""

__version__ = "0.1.0"
