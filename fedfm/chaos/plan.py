"""The fault a seed chooses for one soak run: its kind, round, site and moment.

The kind rotates with the seed (consecutive seeds cover every kind); everything else is drawn
from a ``random.Random`` seeded with the seed, so ``fedfm chaos --seed S --runs 1`` replays run S exactly.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from fedfm.protocol import site_name

KILL_CLIENTAPP = "kill-clientapp"  # SIGKILL a site's ClientApp process (the one training) mid-round
RESTART_SUPERNODE = "restart-supernode"  # SIGKILL a site's SuperNode and its apps, restart it with the same key
KILL_COORDINATOR = "kill-coordinator"  # SIGKILL the SuperLink and its ServerApp mid-run; restart, resume
KILL_IN_LEDGER_WRITE = "kill-in-ledger-write"  # SIGKILL a site's ClientApp inside its ledger (or head) write
KILL_IN_CHECKPOINT_WRITE = "kill-in-checkpoint-write"  # SIGKILL the coordinator inside a checkpoint write
DISK_FULL = "disk-full"  # a site's disk (a tmpfs) fills up for a round, then is freed
DROP_REPLY = "drop-reply"  # a site's train reply arrives after the round timeout: the server drops it
DELAY_REPLY = "delay-reply"  # a site's train reply is late but within the timeout

KINDS = (KILL_IN_LEDGER_WRITE, KILL_IN_CHECKPOINT_WRITE, KILL_COORDINATOR, KILL_CLIENTAPP, DISK_FULL,
         RESTART_SUPERNODE, DROP_REPLY, DELAY_REPLY)

# where inside a write the process dies
LEDGER_POINTS = ("temp-partial", "before-rename", "after-rename", "head-partial")
CHECKPOINT_POINTS = ("adapter-partial", "after-adapter", "results-partial", "after-results", "state-partial",
                     "after-state")

SITE_SIDE = (KILL_CLIENTAPP, RESTART_SUPERNODE, KILL_IN_LEDGER_WRITE, DISK_FULL, DROP_REPLY, DELAY_REPLY)


@dataclass(frozen=True)
class Fault:
    seed: int
    kind: str
    round: int  # the round the fault hits (1-based)
    site: int  # the site it hits (site-side kinds)
    delay_s: float = 0.0  # how long into the round (external kills, disk fill)
    point: str = ""  # where inside a write (kills inside writes)
    fraction: float = 0.0  # how much of a torn write reached the file
    pause_s: float = 0.0  # restart-supernode: how long the site stays down
    sleep_s: float = 0.0  # delay-reply / drop-reply: how long the reply is held back

    @property
    def site_side(self) -> bool:
        return self.kind in SITE_SIDE

    def describe(self) -> str:
        where = site_name(self.site) if self.site_side else "coordinator"
        extra = {KILL_IN_LEDGER_WRITE: f" at {self.point} ({self.fraction:.0%} written)",
                 KILL_IN_CHECKPOINT_WRITE: f" at {self.point} ({self.fraction:.0%} written)",
                 RESTART_SUPERNODE: f" {self.delay_s:.1f} s in, down {self.pause_s:.1f} s",
                 DROP_REPLY: f" held {self.sleep_s:.0f} s", DELAY_REPLY: f" held {self.sleep_s:.1f} s"}
        return f"seed {self.seed}: {self.kind} on {where} in round {self.round}" + extra.get(
            self.kind, f" {self.delay_s:.1f} s in")

    def to_dict(self) -> dict:
        return asdict(self)


def plan_fault(seed: int, rounds: int, sites: int, round_timeout_s: float) -> Fault:
    """The fault of run ``seed`` in a run of ``rounds`` rounds and ``sites`` sites."""
    if rounds < 1 or sites < 1:
        raise ValueError(f"a soak run needs at least 1 round and 1 site, not rounds={rounds} sites={sites}")
    rng = random.Random(f"fedfm-chaos-{seed}")  # a string seed: consecutive seeds draw unrelated moments
    kind = KINDS[seed % len(KINDS)]
    common = {"seed": seed, "kind": kind, "round": rng.randint(1, rounds), "site": rng.randrange(sites),
              "delay_s": round(rng.uniform(0.0, 8.0), 2)}
    if kind == KILL_IN_LEDGER_WRITE:
        return Fault(**common, point=rng.choice(LEDGER_POINTS), fraction=round(rng.uniform(0.05, 0.95), 3))
    if kind == KILL_IN_CHECKPOINT_WRITE:
        return Fault(**common, point=rng.choice(CHECKPOINT_POINTS), fraction=round(rng.uniform(0.05, 0.95), 3))
    if kind == KILL_COORDINATOR:
        # a deployment round of the soak's run takes a few seconds (site workers, packed adapters)
        return Fault(**{**common, "delay_s": round(rng.uniform(0.0, 6.0), 2)})
    if kind == RESTART_SUPERNODE:
        return Fault(**common, pause_s=round(rng.uniform(0.0, 10.0), 2))
    if kind == DROP_REPLY:
        return Fault(**common, sleep_s=float(round_timeout_s) + 15.0)
    if kind == DELAY_REPLY:
        return Fault(**common, sleep_s=round(rng.uniform(1.0, min(15.0, round_timeout_s / 3)), 2))
    return Fault(**common)
