"""Flower ClientApp glue for fedfm (the library lives in ``fedfm``)."""
