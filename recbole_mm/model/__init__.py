"""Plugin models. Importing this package registers every model (``@register_model``)."""
