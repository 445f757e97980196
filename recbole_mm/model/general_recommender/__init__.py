"""General (user-item graph) multimodal models (one model per file; the file is named after the model)."""

from recbole_mm.model.general_recommender.fmmrec import FMMRec
from recbole_mm.model.general_recommender.freedom import FREEDOM
from recbole_mm.model.general_recommender.lattice import LATTICE

__all__ = ["FMMRec", "FREEDOM", "LATTICE"]
