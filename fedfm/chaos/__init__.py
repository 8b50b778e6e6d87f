"""``fedfm chaos``: a randomized fault soak of the local deployment.

Many short deployment runs (:mod:`fedfm.deploy.local`: TLS, node authentication, one SuperNode
per site), each with one fault a seed chooses (:mod:`fedfm.chaos.plan`): which fault, which
round, which moment. Faults are injected from outside (SIGKILL of a ClientApp, a SuperNode or
the coordinator; a site's disk filled) or from inside a process by :mod:`fedfm.chaos.hooks`
(SIGKILL in the middle of a ledger or checkpoint write, a reply delayed or dropped). After each
run is resumed to its end, :mod:`fedfm.chaos.checks` checks the ledgers, the budgets, the
epsilons, the results against an unbroken run and that no process is left.
"""
