"""Each image site's politeness budget, shared by every crawl of the fleet.

One Ray actor books request starts for all workers on all machines: ``requests_per_second`` is
then the site's rate for the whole fleet, not for each worker, and a site's ``Retry-After``
pause holds back every worker. A site's ``concurrency`` stays per crawl.
"""

from __future__ import annotations

import time

ACTOR_NAME, NAMESPACE = "lorafactory-site-budgets", "lorafactory"


class SiteBudgets:
    """The actor's state: per site, the next free request start and a pause (wall-clock seconds, so
    a booking means the same moment on every machine of the cluster)."""

    def __init__(self) -> None:
        self.next: dict[str, float] = {}
        self.paused_until: dict[str, float] = {}

    def reserve(self, site: str, interval: float) -> float:
        """Book the site's next request start; returns it (wall-clock time)."""
        now = time.time()
        start = max(now, self.next.get(site, 0.0), self.paused_until.get(site, 0.0))
        self.next[site] = start + interval
        return start

    def pause(self, site: str, seconds: float) -> None:
        self.paused_until[site] = max(self.paused_until.get(site, 0.0), time.time() + seconds)


class RayBudget:
    """``sources.http.SharedBudget`` over the fleet's actor; travels to workers with their jobs. The
    wait is counted from the booked moment when the answer arrives, so the call's own delay (a busy
    machine) does not push the request later, where it would crowd the next one booked."""

    def __init__(self, actor) -> None:
        self.actor = actor

    async def reserve(self, site: str, interval: float) -> float:
        start = await self.actor.reserve.remote(site, interval)
        return start - time.time()

    def pause(self, site: str, seconds: float) -> None:
        self.actor.pause.remote(site, seconds)  # fire and forget: the next reservation sees it


def fleet_budget(ray) -> RayBudget:
    """The cluster's budget actor: created by the first driver that asks, found by name by the others
    and by a restarted driver; it lives as long as the cluster (detached), restarted if it dies."""
    options = dict(name=ACTOR_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, max_restarts=-1)
    return RayBudget(ray.remote(num_cpus=0)(SiteBudgets).options(**options).remote())
