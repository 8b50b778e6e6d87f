"""Audits of what a run spent, above the sites: every ledger's chain, signatures and epsilons
recomputed independently (:mod:`fedfm.audit.ledgers`), and an empirical lower bound from
gradient canaries replayed through a site's training (:mod:`fedfm.audit.empirical`,
:mod:`fedfm.audit.canaries`, :mod:`fedfm.audit.one_run`)."""

from fedfm.audit.ledgers import SiteAudit, audit_ledger, audit_run, find_ledgers, write_audit

__all__ = ["SiteAudit", "audit_ledger", "audit_run", "find_ledgers", "write_audit"]
