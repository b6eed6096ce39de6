"""datencoder: the Domain-Agnostic Tuning-Encoder and the stages around it."""

import os


# Nothing may download weights or data at run time: hub look-ups resolve from the local cache only.
# A user who really wants downloads sets HF_HUB_OFFLINE=0 explicitly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", os.environ["HF_HUB_OFFLINE"])

__version__ = "0.1.0"
