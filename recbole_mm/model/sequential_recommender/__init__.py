"""Multimodal sequential models (one model per file; the file is named after the model)."""

from recbole_mm.model.sequential_recommender.contentknn import ContentKNN
from recbole_mm.model.sequential_recommender.iisan import IISAN, IISANVersa
from recbole_mm.model.sequential_recommender.mmsr import MMSR
from recbole_mm.model.sequential_recommender.morec import MoRec
from recbole_mm.model.sequential_recommender.odmt import ODMT
from recbole_mm.model.sequential_recommender.pmmrec import PMMRec

__all__ = ["ContentKNN", "IISAN", "IISANVersa", "MMSR", "MoRec", "ODMT", "PMMRec"]
