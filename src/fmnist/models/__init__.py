"""Stage 2, models and recipes: the registry (each entry an architecture, its arguments and
the recipe it is trained with), the architectures, and their size and cost."""
