"""Deployment across hospital sites: PKI (``pki``), ``fedfm deploy init`` (``init``), ``fedfm deploy local`` (``local``)."""
