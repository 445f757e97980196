"""Plugin models. Importing this package registers every model (``@register_model``)."""

from recbole_mm.model import general_recommender, sequential_recommender  # noqa: F401
