"""Lightning callbacks of lit_sapo, installed as ``lit_sapo.callbacks``."""
