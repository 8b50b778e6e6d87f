"""Flower ServerApp glue for fedfm (the library lives in ``fedfm``)."""
