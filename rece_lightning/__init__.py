"""rece-lightning: RECE concept erasure (Gong et al., ECCV 2024) for Stable Diffusion as a Lightning module."""

from rece_lightning.data import ConceptDataModule, ConceptSet
from rece_lightning.export import load_erased, save_erased
from rece_lightning.module import RECEModule

__all__ = ["ConceptDataModule", "ConceptSet", "RECEModule", "load_erased", "save_erased"]
__version__ = "0.1.0"
